"""Serialisation and Auto classes: save/load round trips, nothing left uninitialised, resolution in a fresh process."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_clip import HfClipModel, HfClipTextModel, HfClipTextModelWithProjection, HfClipVisionModel
from hf_clip.testing_utils import random_text, tiny_config


def tiny_model(seed: int = 0) -> HfClipModel:
    torch.manual_seed(seed)
    return HfClipModel(tiny_config()).eval()


def tiny_inputs() -> dict[str, torch.Tensor]:
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {**random_text(3, 16, [16, 9, 3]), "pixel_values": pixels}


def assert_same_outputs(model: HfClipModel, loaded: HfClipModel) -> None:
    inputs = tiny_inputs()
    with torch.no_grad():
        expected, actual = model(**inputs), loaded(**inputs)
    for field in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert torch.equal(actual[field], expected[field]), field


def test_save_and_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded, loading_info = HfClipModel.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not keys for keys in loading_info.values()), loading_info
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert_same_outputs(model, loaded.eval())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hf_clip"


def test_loading_leaves_nothing_uninitialised(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    first, second = HfClipModel.from_pretrained(tmp_path), HfClipModel.from_pretrained(tmp_path)
    # Loading twice is bitwise reproducible: no parameter or buffer is left to chance (or to torch.empty).
    for (name, tensor), (_, other) in zip(
        first.state_dict(keep_vars=True).items(), second.state_dict(keep_vars=True).items(), strict=True
    ):
        assert torch.equal(tensor, other), name
    # Non-persistent buffers are not in the checkpoint: `_init_weights` must refill them.
    embeddings = (first.text_model.embeddings, first.vision_model.embeddings)
    for embedding in embeddings:
        positions = embedding.position_ids
        assert positions.device.type == "cpu"
        assert torch.equal(positions, torch.arange(positions.shape[-1])[None])
    assert dict(first.named_buffers()).keys() == {
        "text_model.embeddings.position_ids",
        "vision_model.embeddings.position_ids",
    }


def test_weights_missing_from_a_checkpoint_get_openai_initialisation(tmp_path: Path) -> None:
    """Missing keys are initialised by `_init_weights` after loading, on the path transformers takes for models defined
    outside its package: the rules must reach tensors inside parameter-less modules (attention, MLP) too."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / "model.safetensors")
    missing = {
        "text_model.encoder.layers.0.self_attn.out_proj.weight": 32**-0.5 * (2 * 2) ** -0.5,
        "text_model.encoder.layers.1.mlp.fc1.weight": (2 * 32) ** -0.5,
        "vision_model.encoder.layers.0.self_attn.q_proj.weight": 32**-0.5,
        "text_projection.weight": 32**-0.5,
    }
    constant = {"text_model.encoder.layers.0.self_attn.out_proj.bias": 0.0, "logit_scale": math.log(1 / 0.07)}
    for key in (*missing, *constant, "vision_model.pre_layrnorm.weight"):
        del state_dict[key]
    save_file(state_dict, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded, loading_info = HfClipModel.from_pretrained(tmp_path, output_loading_info=True)
    assert loading_info["missing_keys"] == {*missing, *constant, "vision_model.pre_layrnorm.weight"}
    parameters = dict(loaded.named_parameters())
    for key, std in missing.items():
        assert parameters[key].std().item() == pytest.approx(std, rel=0.15), key
    for key, value in constant.items():
        assert torch.allclose(parameters[key], torch.full_like(parameters[key], value)), key
    assert torch.equal(parameters["vision_model.pre_layrnorm.weight"], torch.ones(32))
    for key, value in state_dict.items():
        assert torch.equal(parameters[key], value), key


def test_single_tower_models_load_from_a_joint_checkpoint(tmp_path: Path) -> None:
    """As with transformers' CLIP, a tower class loads its sub-config and weights from the joint model's folder."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    text_model, loading_info = HfClipTextModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not loading_info["missing_keys"] and not loading_info["mismatched_keys"]
    text = {key: value for key, value in tiny_inputs().items() if key != "pixel_values"}
    with torch.no_grad():
        assert torch.equal(text_model.eval()(**text).text_embeds, model.get_text_features(**text).pooler_output)


AUTO_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

    folder, towers = sys.argv[1], sys.argv[2:]
    report = {}
    try:  # Before `import hf_clip` nothing resolves: the registration is what the checks below exercise.
        AutoConfig.from_pretrained(folder)
        report["before_import"] = "resolved"
    except ValueError as error:
        report["before_import"] = str(error)

    import hf_clip

    report["AutoConfig"] = type(AutoConfig.from_pretrained(folder)).__name__
    inputs = torch.load(f"{folder}/inputs.pt", weights_only=True)
    for auto_class in (AutoModel, AutoModelForZeroShotImageClassification):
        model = auto_class.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.save(model(**inputs).logits_per_image, f"{folder}/{auto_class.__name__}.pt")
        report[auto_class.__name__] = type(model).__name__
    for tower in towers:
        classes = (type(AutoConfig.from_pretrained(tower)), type(AutoModel.from_pretrained(tower)))
        report[tower] = [cls.__name__ for cls in classes]
    print(json.dumps(report))
    """
)


def test_auto_classes_resolve_in_a_fresh_process(tmp_path: Path) -> None:
    model = tiny_model()
    joint, text, vision = tmp_path / "joint", tmp_path / "text", tmp_path / "vision"
    model.save_pretrained(joint)
    HfClipTextModel(model.config.text_config).save_pretrained(text)
    HfClipVisionModel(model.config.vision_config).save_pretrained(vision)
    inputs = tiny_inputs()
    torch.save(inputs, joint / "inputs.pt")

    result = subprocess.run(
        [sys.executable, "-c", AUTO_CHECK, str(joint), str(text), str(vision)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert "hf_clip" in report["before_import"]
    assert report["AutoConfig"] == "HfClipConfig"
    assert report["AutoModel"] == report["AutoModelForZeroShotImageClassification"] == "HfClipModel"
    assert report[str(text)] == ["HfClipTextConfig", "HfClipTextModel"]
    assert report[str(vision)] == ["HfClipVisionConfig", "HfClipVisionModel"]
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    for auto_class in ("AutoModel", "AutoModelForZeroShotImageClassification"):
        assert torch.equal(torch.load(joint / f"{auto_class}.pt", weights_only=True), expected), auto_class
