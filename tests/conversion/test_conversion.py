"""Conversion of OpenAI, open_clip and transformers checkpoints into hf_clip, and of hf_clip ViTs back to
transformers: every path reproduces the source's outputs at fp32 atol=1e-5.

The reference is always the source implementation itself (the original open_clip model object, or transformers'
CLIPModel), never a model rebuilt from the converted config, so an inference mistake cannot hide behind itself."""

import json
import os

import pytest
import torch
from open_clip.model import CLIP
from transformers import CLIPConfig, CLIPModel

from conversion.architectures import architecture_of, published_architecture
from conversion.checks import ParityError, assert_parity, clip_model_outputs, parity_inputs
from conversion.convert_open_clip import (
    config_for,
    convert_open_clip,
    convert_open_clip_state_dict,
    load_open_clip_source,
)
from conversion.convert_openai import convert_and_verify, convert_openai_state_dict, infer_openai_config
from conversion.convert_transformers import (
    convert_hf_clip_state_dict_to_transformers,
    convert_transformers_state_dict,
    export_to_transformers,
    from_transformers,
    hf_clip_config_from_transformers,
    to_transformers,
)
from conversion.open_clip_reference import hf_clip_config_from_open_clip, open_clip_outputs
from conversion.safe_loading import load_torch_file
from conversion.testing_utils import (
    randomize_,
    save_hub_folder,
    save_training_checkpoint,
    tiny_model_for,
    tiny_open_clip,
    tiny_processor,
)
from hf_clip import HfClipConfig, HfClipModel
from hf_clip.foreign_configs import transformers_clip_config
from hf_clip.testing_utils import tiny_clip_config

FAMILIES = ("vit", "resnet")


def assert_matches_open_clip(model: HfClipModel, source: CLIP) -> dict[str, float]:
    inputs = parity_inputs(model.config, seed=1)
    return assert_parity(open_clip_outputs(source, inputs), clip_model_outputs(model, inputs), "vs original open_clip")


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_inferred_from_weights_equals_open_clip_config(family):
    source, model_cfg = tiny_open_clip(family)
    inferred = infer_openai_config(source.state_dict())
    assert architecture_of(inferred) == architecture_of(hf_clip_config_from_open_clip(model_cfg))
    assert inferred.vision_config.backbone == family
    assert published_architecture(inferred) is None  # tiny: no published architecture matches


@pytest.mark.parametrize("name", HfClipConfig.architecture_names())
def test_each_published_architecture_is_recognised(name):
    assert published_architecture(HfClipConfig.from_architecture(name)) == name


@pytest.mark.parametrize("family", FAMILIES)
def test_openai_state_dict_converts_and_matches_open_clip(family, tmp_path):
    source, _ = tiny_open_clip(family)
    torch.save(source.state_dict(), tmp_path / "openai.pt")
    state_dict = load_torch_file(tmp_path / "openai.pt")
    # OpenAI's archives carry metadata entries beside the weights; the converter drops them.
    state_dict.update(input_resolution=torch.tensor(224), context_length=torch.tensor(16), vocab_size=torch.tensor(99))
    config = infer_openai_config(state_dict)
    model, differences = convert_and_verify(state_dict, config)
    assert max(differences.values()) <= 1e-5
    assert_matches_open_clip(model, source)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_checkpoint_converts_and_matches_open_clip(family, tmp_path):
    source, model_cfg = tiny_open_clip(family)
    state_dict, hub_config = load_open_clip_source(save_training_checkpoint(source, tmp_path / "epoch_3.pt"))
    assert hub_config is None and not any(key.startswith("module.") for key in state_dict)
    with pytest.raises(ValueError, match="--model-name"):
        convert_open_clip(state_dict)  # activation unknown: refused, not guessed
    model, _ = convert_open_clip(state_dict, activation="quick_gelu")
    assert_matches_open_clip(model, source)
    model, _ = convert_open_clip(state_dict, model_cfg=model_cfg)
    assert_matches_open_clip(model, source)


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_folder_converts_and_matches_open_clip(family, tmp_path):
    source, model_cfg = tiny_open_clip(family)
    state_dict, hub_config = load_open_clip_source(save_hub_folder(source, model_cfg, tmp_path / "hub"))
    assert hub_config is not None and hub_config["model_cfg"] == model_cfg
    model, _ = convert_open_clip(state_dict, hub_config["model_cfg"])
    assert_matches_open_clip(model, source)


def test_gelu_model_converts_and_the_gate_catches_the_wrong_activation():
    source, model_cfg = tiny_open_clip("vit", quick_gelu=False)
    model, _ = convert_open_clip(source.state_dict(), model_cfg=model_cfg)
    assert model.config.text_config.hidden_act == "gelu"
    assert_matches_open_clip(model, source)
    # GELU vs QuickGELU keeps every shape; only the 1e-5 gate tells them apart.
    config = infer_openai_config(source.state_dict(), hidden_act="quick_gelu")
    wrong = HfClipModel(config).eval()
    wrong.load_state_dict(convert_openai_state_dict(source.state_dict(), config))
    with pytest.raises(ParityError, match="differ beyond atol"):
        assert_matches_open_clip(wrong, source)


def test_wrong_head_count_is_caught():
    source, model_cfg = tiny_open_clip("vit")
    wrong_cfg = json.loads(json.dumps(model_cfg))
    wrong_cfg["text_cfg"]["heads"] = 4  # same weights, different split into heads
    config = hf_clip_config_from_open_clip(wrong_cfg)
    wrong = HfClipModel(config).eval()
    wrong.load_state_dict(convert_open_clip_state_dict(source.state_dict(), config))
    with pytest.raises(ParityError):
        assert_matches_open_clip(wrong, source)


def test_config_that_contradicts_the_weights_is_refused():
    source, model_cfg = tiny_open_clip("resnet")
    wrong_cfg = json.loads(json.dumps(model_cfg))
    wrong_cfg["vision_cfg"]["layers"] = [1, 1, 1, 1]
    with pytest.raises(ValueError, match="does not describe these weights"):
        config_for(source.state_dict(), wrong_cfg, None)


def test_unsupported_open_clip_options_are_refused_by_name():
    _, model_cfg = tiny_open_clip("vit")
    for section, option in (("vision_cfg", {"attentional_pool": True}), ("text_cfg", {"proj_bias": True})):
        bad = json.loads(json.dumps(model_cfg))
        bad[section].update(option)
        with pytest.raises(ValueError, match=next(iter(option))):
            hf_clip_config_from_open_clip(bad)


def test_leftover_keys_are_an_error():
    source, _ = tiny_open_clip("vit")
    state_dict = {**source.state_dict(), "visual.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="no mapping"):
        convert_openai_state_dict(state_dict, infer_openai_config(state_dict))


@pytest.fixture(scope="module")
def tiny_transformers_clip() -> CLIPModel:
    torch.manual_seed(0)
    return randomize_(CLIPModel(tiny_clip_config()))


def test_transformers_round_trip_is_exact(tiny_transformers_clip):
    model, differences = from_transformers(tiny_transformers_clip)
    assert max(differences.values()) <= 1e-5
    exported, _ = to_transformers(model)
    original, back = tiny_transformers_clip.state_dict(), exported.state_dict()
    assert original.keys() == back.keys()
    assert all(torch.equal(original[key], back[key]) for key in original)
    original_config, back_config = tiny_transformers_clip.config.to_dict(), exported.config.to_dict()
    for sub in ("text_config", "vision_config"):
        for field, value in original_config[sub].items():
            if field not in ("transformers_version", "_name_or_path", "architectures", "dtype"):
                assert back_config[sub][field] == value, (sub, field)


def test_transformers_state_dict_conversion_is_identity(tiny_transformers_clip):
    config = hf_clip_config_from_transformers(tiny_transformers_clip.config)
    state_dict = tiny_transformers_clip.state_dict()
    stale = {**state_dict, "text_model.embeddings.position_ids": torch.arange(16)[None]}
    converted = convert_transformers_state_dict(stale, config)
    assert converted.keys() == state_dict.keys()
    assert convert_hf_clip_state_dict_to_transformers(converted, config).keys() == state_dict.keys()


def test_legacy_eos_token_id_pools_at_the_last_vocabulary_entry(tiny_transformers_clip):
    legacy = CLIPConfig.from_dict(tiny_transformers_clip.config.to_dict())
    legacy.text_config.eos_token_id = 2  # transformers' original CLIP configs: "pool at the highest id"
    config = hf_clip_config_from_transformers(legacy)
    assert (config.text_config.bos_token_id, config.text_config.eos_token_id) == (97, 98)


def test_resnet_export_to_transformers_is_refused():
    source, _ = tiny_open_clip("resnet")
    with pytest.raises(ValueError, match="only a ViT"):
        transformers_clip_config(infer_openai_config(source.state_dict()))


@pytest.fixture(scope="module")
def exported_folder(tmp_path_factory):
    processor = tiny_processor(image_size=32)
    model = tiny_model_for(processor)
    folder = tmp_path_factory.mktemp("exported")
    return model, folder, export_to_transformers(model, processor, folder)


def test_vit_export_loads_as_clip_model_without_hf_clip(exported_folder):
    _, folder, report = exported_folder
    # The worker proved `import hf_clip` fails before loading; these are stock transformers classes.
    assert report["classes"]["CLIPModel"] == "transformers.models.clip.modeling_clip.CLIPModel"
    assert report["classes"]["AutoModel"] == "transformers.models.clip.modeling_clip.CLIPModel"
    assert report["classes"]["tokenizer"] == "CLIPTokenizer"
    assert report["vocab_size"] == len(tiny_processor(32).tokenizer)
    assert all(max(diffs.values()) <= 1e-5 for diffs in report["max_differences"].values())
    assert len(report["pipeline_scores"]) == 3
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "clip" and "auto_map" not in config
    assert not list(folder.glob("*.py"))


def test_blocked_interpreter_cannot_import_hf_clip():
    import subprocess
    import sys

    from conversion.load_check import WORKER

    code = "import runpy, sys; runpy.run_path(sys.argv[1])['_block_hf_clip'](); import hf_clip"
    result = subprocess.run([sys.executable, "-I", "-c", code, str(WORKER)], capture_output=True, text=True)
    assert result.returncode != 0 and "No module named 'hf_clip'" in result.stderr


def _converted(state_dict, config) -> HfClipModel:
    """The converter's pure function into a model, without its internal reference (saves memory at full size)."""
    model = HfClipModel(config).eval()
    model.load_state_dict(convert_open_clip_state_dict(state_dict, config), strict=True)
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"],
)
def test_published_architecture_full_size(name, tmp_path):
    """Full-size `-quickgelu` open_clip models with random weights, in all three source formats, against the
    original open_clip model. Set HF_CLIP_CONVERSION_REPORT=path to append the measured max differences."""
    import open_clip

    model_cfg = open_clip.get_model_config(f"{name}-quickgelu")
    torch.manual_seed(0)
    source = randomize_(CLIP(**model_cfg))
    torch.save(source.state_dict(), tmp_path / "openai.pt")
    state_dict = load_torch_file(tmp_path / "openai.pt")
    config = infer_openai_config(state_dict)
    assert published_architecture(config) == name
    measured = {"openai_state_dict": assert_matches_open_clip(_converted(state_dict, config), source)}
    del state_dict
    epoch_state_dict, _ = load_open_clip_source(save_training_checkpoint(source, tmp_path / "epoch_1.pt"))
    epoch_config = config_for(epoch_state_dict, model_cfg, None)
    measured["training_checkpoint"] = assert_matches_open_clip(_converted(epoch_state_dict, epoch_config), source)
    del epoch_state_dict
    hub_state_dict, hub_config = load_open_clip_source(save_hub_folder(source, model_cfg, tmp_path / "hub"))
    hub_model_config = config_for(hub_state_dict, hub_config["model_cfg"], None)
    measured["hub"] = assert_matches_open_clip(_converted(hub_state_dict, hub_model_config), source)
    inputs = parity_inputs(config, seed=1)
    reference = open_clip_outputs(source, inputs)
    measured["reference_max_abs"] = {key: value.abs().max().item() for key, value in reference.items()}
    if report_path := os.environ.get("HF_CLIP_CONVERSION_REPORT"):
        with open(report_path, "a") as report:
            report.write(
                json.dumps({"name": name, "parameters": sum(p.numel() for p in source.parameters()), **measured})
                + "\n"
            )
