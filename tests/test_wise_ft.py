"""WiSE-FT: weight-space mixing of a zero-shot and a fine-tuned checkpoint (hf_clip.wise_ft), its folder helper and
its CLI."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_clip import HfClipConfig, HfClipImageProcessor, HfClipModel, HfClipProcessor, train_clip_bpe
from hf_clip.testing_utils import TINY_RESNET, TINY_TEXT, TINY_VIT, random_images, tiny_config
from hf_clip.wise_ft import interpolate_state_dicts, main, wise_ft, wise_ft_folders

REPO = Path(__file__).resolve().parents[1]
BACKBONES = {"vit": TINY_VIT, "resnet": TINY_RESNET}
LABELS = ["a red square", "a blue circle", "a green square"]


def update_batch_norm_statistics(model: HfClipModel, batches: int, seed: int) -> None:
    """Train-mode forward passes: BatchNorm running statistics move and `num_batches_tracked` counts the batches."""
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model.get_image_features(pixel_values=torch.randn(4, 3, size, size, generator=generator))
    model.eval()


def fine_tune(zero_shot: HfClipModel, seed: int) -> HfClipModel:
    """A copy of `zero_shot` that differs from it in every state-dict tensor, as fine-tuning leaves it."""
    model = copy.deepcopy(zero_shot)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    update_batch_norm_statistics(model, batches=2, seed=seed)
    return model


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def checkpoints(request) -> tuple[HfClipModel, HfClipModel]:
    torch.manual_seed(0)
    zero_shot = HfClipModel(tiny_config(BACKBONES[request.param])).eval()
    update_batch_norm_statistics(zero_shot, batches=1, seed=1)
    fine_tuned = fine_tune(zero_shot, seed=2)
    # Every tensor differs, so the comparisons below can fail (ResNet: running stats and batch counts included).
    for name, tensor in zero_shot.state_dict().items():
        assert not torch.equal(tensor, fine_tuned.state_dict()[name]), name
    if request.param == "resnet":
        assert any(name.endswith("running_var") for name in zero_shot.state_dict())
    return zero_shot, fine_tuned


def snapshot(model: HfClipModel) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_ends_reproduce_each_checkpoint_bit_for_bit(checkpoints, alpha):
    expected = checkpoints[int(alpha)].state_dict()
    mixed = wise_ft(*checkpoints, alpha).state_dict()
    assert list(mixed) == list(expected)
    for name, tensor in expected.items():
        assert mixed[name].dtype == tensor.dtype and torch.equal(mixed[name], tensor), name


def test_half_precision_checkpoints_mix_in_their_own_dtype(checkpoints):
    zero_shot, fine_tuned = (copy.deepcopy(model).to(torch.bfloat16) for model in checkpoints)
    mixed = wise_ft(zero_shot, fine_tuned, 1.0).state_dict()
    for name, tensor in fine_tuned.state_dict().items():
        assert mixed[name].dtype == tensor.dtype and torch.equal(mixed[name], tensor), name
    assert mixed["logit_scale"].dtype == torch.bfloat16


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_inner_alpha_mixes_every_floating_tensor_and_takes_counts_from_the_nearer_end(checkpoints, alpha):
    zero_shot, fine_tuned = (model.state_dict() for model in checkpoints)
    mixed = wise_ft(*checkpoints, alpha).state_dict()
    for name, tensor in zero_shot.items():
        if tensor.is_floating_point():
            expected = (1 - alpha) * tensor.double() + alpha * fine_tuned[name].double()
            torch.testing.assert_close(mixed[name].double(), expected, rtol=1e-6, atol=1e-6, msg=name)
        else:  # num_batches_tracked: 1 (zero-shot) and 3 (fine-tuned); a tie goes to the fine-tuned end
            assert torch.equal(mixed[name], (fine_tuned if alpha >= 0.5 else zero_shot)[name]), name


def test_inputs_are_untouched_and_share_no_memory_with_the_result(checkpoints):
    zero_shot, fine_tuned = checkpoints
    before = [snapshot(zero_shot), snapshot(fine_tuned)]
    configs = [zero_shot.config.to_dict(), fine_tuned.config.to_dict()]
    for alpha in (0.0, 0.5, 1.0):
        mixed = wise_ft(zero_shot, fine_tuned, alpha)
        # Changing the result in place (weights, and BatchNorm statistics through a train-mode pass) leaves both
        # inputs as they were: nothing, integer buffers included, is shared.
        with torch.no_grad():
            for parameter in mixed.parameters():
                parameter.add_(1.0)
        update_batch_norm_statistics(mixed, batches=1, seed=3)
    for model, state, config in zip(checkpoints, before, configs, strict=True):
        assert config == model.config.to_dict()
        for name, tensor in state.items():
            assert torch.equal(model.state_dict()[name], tensor), name


def test_different_architectures_raise_naming_the_first_difference():
    torch.manual_seed(0)
    vit = HfClipModel(tiny_config())
    other_activation = HfClipModel(
        HfClipConfig(text_config={**TINY_TEXT, "hidden_act": "gelu"}, vision_config=TINY_VIT, projection_dim=16)
    )
    # Same keys and shapes, another function: only the config tells them apart.
    with pytest.raises(ValueError, match=r"text_config\.hidden_act is 'quick_gelu' \(zero-shot\) vs 'gelu'"):
        wise_ft(vit, other_activation, 0.5)
    with pytest.raises(
        ValueError,
        match=r"vision_config\.hidden_size is 32 \(zero-shot\) vs 768 .*also differing: .*vision_config\.backbone",
    ):
        wise_ft(vit, HfClipModel(tiny_config(TINY_RESNET)), 0.5)
    state = vit.state_dict()
    with pytest.raises(ValueError, match="key 'logit_scale' is in the zero-shot state dict but not in the fine-tuned"):
        interpolate_state_dicts(state, {name: t for name, t in state.items() if name != "logit_scale"}, 0.5)
    extra = {**state, "logit_bias": torch.tensor(-10.0)}
    with pytest.raises(ValueError, match="key 'logit_bias' is in the fine-tuned state dict but not in the zero-shot"):
        interpolate_state_dicts(state, extra, 0.5)
    narrower = {**state, "text_projection.weight": state["text_projection.weight"][:8]}
    with pytest.raises(ValueError, match=r"'text_projection.weight' has shape \(16, 32\) \(zero-shot\) vs \(8, 32\)"):
        interpolate_state_dicts(state, narrower, 0.5)
    half = {**state, "logit_scale": state["logit_scale"].half()}
    with pytest.raises(ValueError, match=r"'logit_scale' has dtype torch.float32 \(zero-shot\) vs torch.float16"):
        interpolate_state_dicts(state, half, 0.5)
    # Keys beyond the model's (a SigLIP logit_bias) mix like any other tensor.
    mixed = interpolate_state_dicts(extra, {**extra, "logit_bias": torch.tensor(-6.0)}, 0.25)
    assert mixed["logit_bias"].item() == -9.0


def test_a_checkpoint_fine_tuned_with_patch_dropout_mixes():
    """Patch dropout acts in training only, so a run that set it still shares the architecture of its start."""
    torch.manual_seed(0)
    zero_shot = HfClipModel(tiny_config())
    fine_tuned = HfClipModel(tiny_config({**TINY_VIT, "patch_dropout": 0.5}))
    fine_tuned.load_state_dict(zero_shot.state_dict())
    assert wise_ft(zero_shot, fine_tuned, 0.5).config.vision_config.patch_dropout == 0.5


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_the_unit_interval_raises(checkpoints, alpha):
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        wise_ft(*checkpoints, alpha)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        interpolate_state_dicts(checkpoints[0].state_dict(), checkpoints[1].state_dict(), alpha)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A zero-shot folder and two fine-tuned ones (with and without a processor) that the pipeline can run."""
    root = tmp_path_factory.mktemp("wise_ft")
    tokenizer = train_clip_bpe(
        [f"this is a photo of {label}." for label in LABELS] * 10,
        vocab_size=600,
        model_max_length=TINY_TEXT["max_position_embeddings"],
    )
    text_config = {
        **TINY_TEXT,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    size = TINY_VIT["image_size"]
    torch.manual_seed(0)
    zero_shot = HfClipModel(HfClipConfig(text_config=text_config, vision_config=TINY_VIT, projection_dim=16)).eval()
    fine_tuned = fine_tune(zero_shot, seed=1)
    paths = {name: root / name for name in ("zero_shot", "fine_tuned", "fine_tuned_bare")}
    zero_shot.save_pretrained(paths["zero_shot"])
    fine_tuned.save_pretrained(paths["fine_tuned"])
    fine_tuned.save_pretrained(paths["fine_tuned_bare"])
    # The two processors differ (a slightly different mean), so an output folder shows which one it copied.
    for name, image_mean in (("zero_shot", [0.5, 0.5, 0.5]), ("fine_tuned", [0.4, 0.4, 0.4])):
        image_processor = HfClipImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=image_mean
        )
        HfClipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(paths[name])
    return paths


def test_cli_writes_one_loadable_folder_per_alpha(folders, tmp_path, capsys):
    from transformers import AutoModel, AutoProcessor, pipeline

    output = tmp_path / "mixed"
    main(
        [
            *("--zero-shot", str(folders["zero_shot"]), "--fine-tuned", str(folders["fine_tuned"])),
            *("--alpha", "0", "0.5", "--alpha", "1", "--output-dir", str(output)),
        ]
    )
    assert sorted(path.name for path in output.iterdir()) == ["alpha_0.00", "alpha_0.50", "alpha_1.00"]
    assert '"0.5": "' + str(output / "alpha_0.50") in capsys.readouterr().out
    for alpha, source in (("0.00", "zero_shot"), ("1.00", "fine_tuned")):
        written, original = (load_file(f / "model.safetensors") for f in (output / f"alpha_{alpha}", folders[source]))
        assert written.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(written[name], tensor), name
    folder = output / "alpha_0.50"
    model = AutoModel.from_pretrained(folder)
    assert isinstance(model, HfClipModel)
    assert list(AutoProcessor.from_pretrained(folder).image_processor.image_mean) == [0.4, 0.4, 0.4]
    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    scores = classifier(random_images(1)[0], candidate_labels=LABELS)
    assert sorted(score["label"] for score in scores) == sorted(LABELS)
    assert abs(sum(score["score"] for score in scores) - 1) < 1e-5
    expected = wise_ft(*(HfClipModel.from_pretrained(folders[n]) for n in ("zero_shot", "fine_tuned")), 0.5)
    written = load_file(folder / "model.safetensors")
    for name, tensor in expected.state_dict().items():
        assert torch.equal(written[name], tensor), name


def test_script_with_one_alpha_writes_the_output_folder_itself_with_the_zero_shot_processor(folders, tmp_path):
    """examples/wise_ft.py in a subprocess; the fine-tuned folder has no processor, so the zero-shot one is copied."""
    output = tmp_path / "mixed"
    command = [sys.executable, str(REPO / "examples" / "wise_ft.py"), "--zero-shot", str(folders["zero_shot"])]
    command += ["--fine-tuned", str(folders["fine_tuned_bare"]), "--alpha", "0.5", "--output-dir", str(output)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    assert (output / "model.safetensors").is_file()
    processor = HfClipProcessor.from_pretrained(output)
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]


def test_folder_errors_come_before_any_loading_or_writing(folders, tmp_path):
    output = tmp_path / "never_written"
    with pytest.raises(ValueError, match=r"neither .* holds a processor"):
        wise_ft_folders(folders["fine_tuned_bare"], folders["fine_tuned_bare"], [0.5], output)
    with pytest.raises(ValueError, match="each alpha must be given once"):
        wise_ft_folders(folders["zero_shot"], folders["fine_tuned"], [0.5, 0.5], output)
    with pytest.raises(SystemExit) as exit_info:
        main(["--zero-shot", "a", "--fine-tuned", "b", "--alpha", "1.5", "--output-dir", str(output)])
    assert exit_info.value.code == 2
    assert not output.exists()
