"""hf_clip.training.finetuning and the fine-tuning options of the run config: layer groups, locked towers (frozen
parameters and BatchNorm statistics), layer-wise learning-rate decay, learning-rate schedules and tracker choice."""

import io
import itertools
import json
import math
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from hf_clip import ClipLoss, HfClipModel, train_clip_bpe
from hf_clip.synthetic import write_webdataset_shard
from hf_clip.testing_utils import TINY_RESNET, TINY_TEXT, TINY_VIT, random_text, tiny_config
from hf_clip.training import TrainConfig, main
from hf_clip.training.finetuning import layer_decay_scales, layer_groups, lock_logit_parameters, lock_tower
from hf_clip.training.objective import ClipObjective
from hf_clip.training.run_folder import read_metrics
from hf_clip.training.steps import ClipEmbedder, build_optimizer, build_scheduler


def random_batch(model: HfClipModel, size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and tiny-vocabulary captions (`random_text`) for a tiny model."""
    image_size = model.config.tower_configs()[1].image_size
    pixel_values = torch.randn(size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    return {"pixel_values": pixel_values, "input_ids": random_text(size, 6, seed=seed)["input_ids"]}


def train_steps(embedder: ClipEmbedder, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    embedder.train()
    for step in range(steps):
        ClipObjective(embedder, ClipLoss())(random_batch(embedder.model, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # zeros, not None: a frozen parameter's grad must stay None


def snapshot(model: HfClipModel) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("vision", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_layer_groups_cover_every_parameter_once(vision):
    model = HfClipModel(tiny_config(vision=vision))
    image_groups, text_groups = layer_groups(model, "image"), layer_groups(model, "text")
    # ViT: embeddings, blocks, head; ResNet: stem, four stages, attention pool; text: embeddings, blocks, head.
    expected_image = 6 if vision is TINY_RESNET else TINY_VIT["num_hidden_layers"] + 2
    assert (len(image_groups), len(text_groups)) == (expected_image, TINY_TEXT["num_hidden_layers"] + 2)
    owners = [
        id(p) for groups in (image_groups, text_groups) for group in groups for m in group for p in m.parameters()
    ]
    assert len(owners) == len(set(owners))
    assert len(owners) + 1 == len(list(model.parameters()))  # + logit_scale
    assert len(layer_decay_scales(model)) == len(list(model.parameters()))


def test_locked_tower_gets_no_gradient_and_stays_bit_identical():
    model = HfClipModel(tiny_config())
    lock_tower(model, "image", unlocked_groups=1)  # only the head (post-LayerNorm + projection) trains
    lock_logit_parameters(model)
    before = snapshot(model)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {name for name in trainable if not name.startswith("text_")} == {
        "vision_model.post_layernorm.weight",
        "vision_model.post_layernorm.bias",
        "visual_projection.weight",
    }
    optimizer = build_optimizer(model, 1e-2, 0.2)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    train_steps(ClipEmbedder(model), optimizer)
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert param.grad is None, name
            assert torch.equal(param, before[name]), name


def test_locked_resnet_stages_keep_their_batchnorm_statistics():
    model = HfClipModel(tiny_config(vision=TINY_RESNET))
    frozen = lock_tower(model, "image", unlocked_groups=2)  # layer4 and the attention pool train
    embedder = ClipEmbedder(model, frozen)
    before = snapshot(model)
    train_steps(embedder, build_optimizer(model, 1e-2, 0.2))
    assert frozen and all(not module.training for module in frozen)
    assert embedder.training and model.vision_model.layer4.training
    buffers = [name for name in before if "running_" in name]
    for name in buffers:
        locked = not name.startswith("vision_model.layer4")
        assert torch.equal(model.state_dict()[name], before[name]) == locked, name
    # Without the lock the same steps move the stem's statistics: the comparison above can fail.
    unlocked = HfClipModel(tiny_config(vision=TINY_RESNET))
    unlocked_before = snapshot(unlocked)
    train_steps(ClipEmbedder(unlocked), build_optimizer(unlocked, 1e-2, 0.2))
    name = "vision_model.stem.bn1.running_mean"
    assert not torch.equal(unlocked.state_dict()[name], unlocked_before[name])


def test_unlocked_groups_are_checked():
    model = HfClipModel(tiny_config())
    with pytest.raises(ValueError, match="between 0 and its"):
        lock_tower(model, "text", unlocked_groups=TINY_TEXT["num_hidden_layers"] + 3)
    lock_tower(model, "image")
    lock_tower(model, "text")
    lock_logit_parameters(model)
    with pytest.raises(ValueError, match="every parameter is frozen"):
        build_optimizer(model, 1e-3, 0.2)


def test_layer_decay_learning_rates_per_group():
    model = HfClipModel(tiny_config())
    decay_image, decay_text, base = 0.5, 0.8, 1e-3
    optimizer = build_optimizer(model, base, 0.2, scales=layer_decay_scales(model, decay_image, decay_text))
    rates = {}
    for group in optimizer.param_groups:
        layer_group = group["name"].split("/")[0]
        for param in group["params"]:
            rates[id(param)] = (layer_group, group["lr"], group["weight_decay"] > 0)
    for tower, decay in (("image", decay_image), ("text", decay_text)):
        groups = layer_groups(model, tower)
        for index, group in enumerate(groups):
            expected = base * decay ** (len(groups) - 1 - index)
            for module in group:
                for param in module.parameters():
                    name, lr, decayed = rates[id(param)]
                    assert name == f"{tower}.{index}" and lr == pytest.approx(expected, rel=1e-12)
                    assert decayed == (param.ndim >= 2)
    assert rates[id(model.logit_scale)][1:] == (base, False)
    # The schedule multiplies every group's own rate, so the ratios hold at every step.
    scheduler = build_scheduler(optimizer, "cosine", warmup_steps=2, max_steps=10, decay_steps=0)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    factor = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]
    assert 0 < factor < 1
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(base * group["lr_scale"] * factor, rel=1e-12)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        layer_decay_scales(model, image_decay=1.5)


def schedule(name: str, steps: int = 100, warmup: int = 10, decay: int = 20) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    optimizer.param_groups[0]["lr_scale"] = 1.0
    scheduler = build_scheduler(optimizer, name, warmup, steps, decay)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_schedules():
    cosine, constant, wsd = schedule("cosine"), schedule("constant"), schedule("wsd")
    for rates in (cosine, constant, wsd):  # the same linear warmup
        assert rates[:11] == pytest.approx([step / 10 for step in range(11)])
    assert constant[10:] == [1.0] * 91
    assert cosine[55] == pytest.approx(0.5) and cosine[100] == pytest.approx(0.0, abs=1e-12)
    # warmup–stable–decay: flat until the last 20 steps, then a cosine decay to 0.
    assert wsd[10:81] == [1.0] * 71
    assert wsd[90] == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert wsd[100] == pytest.approx(0.0, abs=1e-12) and all(a >= b for a, b in itertools.pairwise(wsd[80:]))
    # Its stable phase does not depend on the run's length: a longer run has the same rates until its own decay.
    assert schedule("wsd", steps=300)[:281] == [*wsd[:81], *[1.0] * 200]


def test_run_config_options_are_checked():
    def check(**values):
        TrainConfig(model_config="ViT-B-32", **values).validate()

    check(lr_scheduler="wsd", max_steps=100, warmup_steps=10)
    assert TrainConfig(model_config="x", max_steps=100, lr_scheduler="wsd").decay_steps() == 10
    # A source's data_files may be one pattern.
    one_pattern = TrainConfig(train_sources='[{"name": "web", "data_files": "web/*.tar", "weight": 2}]')
    (spec,) = one_pattern.train_specs()
    assert (spec.name, spec.data_files, spec.weight, spec.data_format) == ("web", ["web/*.tar"], 2.0, "webdataset")
    for values, message in (
        ({"loss": "hinge"}, "loss must be one of"),
        ({"lr_scheduler": "linear"}, "lr_scheduler must be one of"),
        ({"lr_scheduler": "wsd", "max_steps": 10, "warmup_steps": 5, "lr_decay_steps": 6}, "lr_decay_steps"),
        ({"lock_image_unlocked_groups": 2}, "without lock_image"),
        ({"patch_dropout": 1.0}, "patch_dropout"),
        ({"log_with": ["tensorbored"]}, "unknown trackers"),
        ({"train_sources": "[{}]"}, "missing fields"),
        ({"train_sources": "{"}, "not valid JSON"),
        ({"train_sources": '[{"name": "a", "data_files": "x.tar", "weight": "heavy"}]'}, "weight must be a number"),
        ({"layer_decay_text": 0.0}, "layer_decay_text"),
    ):
        with pytest.raises(ValueError, match=message):
            check(**values)


def test_help_lists_every_option():
    """`--help` formats every field's help (argparse reads a bare % in a help text as a format directive)."""
    from transformers import HfArgumentParser

    text = HfArgumentParser(TrainConfig).format_help()
    for option in ("--train_sources", "--lr_decay_steps", "--lock_image_unlocked_groups", "--log_with", "--loss"):
        assert option in text


def test_trackers():
    from accelerate.tracking import get_available_trackers

    assert TrainConfig(log_with=["none"]).trackers() == []
    assert TrainConfig().trackers() == ["tensorboard"]
    installed = {str(tracker.value) for tracker in get_available_trackers()}
    absent = next(name for name in ("aim", "clearml", "dvclive", "swanlab", "comet_ml") if name not in installed)
    with pytest.raises(ImportError, match=absent):
        TrainConfig(log_with=["tensorboard", absent]).trackers()


# --- the options through a real training run ------------------------------------------------------------------

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (240, 240, 240)}


def square(colour: str, index: int, image_format: str) -> bytes:
    rng = np.random.default_rng(index)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (24, 30, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, image_format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A webdataset source (`jpg`/`txt`) and a parquet source (`image`/`caption`, every third caption empty), a
    tokenizer and a saved tiny model to fine-tune."""
    folder = tmp_path_factory.mktemp("sources")
    colours = list(COLOURS)
    write_webdataset_shard(
        folder / "photos.tar",
        (
            (
                f"s{i:03d}",
                {"jpg": square(colours[i % 4], i, "JPEG"), "txt": f"a photo of a {colours[i % 4]} square".encode()},
            )
            for i in range(32)
        ),
    )
    rows = {
        "image": [{"bytes": square(colours[i % 4], 100 + i, "PNG"), "path": None} for i in range(32)],
        "caption": ["" if i % 3 == 0 else f"a drawing of a {colours[i % 4]} square" for i in range(32)],
    }
    datasets.Dataset.from_dict(rows).to_parquet(folder / "drawings.parquet")
    tokenizer = train_clip_bpe(
        [f"a {kind} of a {c} square" for kind in ("photo", "drawing") for c in colours] * 4, vocab_size=600
    )
    tokenizer.save_pretrained(folder / "start")
    config = tiny_config(vision=TINY_RESNET)
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.eos_token_id, config.text_config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    HfClipModel(config).save_pretrained(folder / "start")
    sources = [
        {"name": "photos", "data_format": "webdataset", "data_files": [str(folder / "photos.tar")], "weight": 3},
        {
            "name": "drawings",
            "data_format": "parquet",
            "data_files": [str(folder / "drawings.parquet")],
            "image_column": "image",
            "text_column": "caption",
            "weight": 1,
        },
    ]
    return folder, sources


def test_fine_tuning_run_with_locks_layer_decay_wsd_sigmoid_and_two_sources(two_sources, tmp_path):
    folder, sources = two_sources
    run_config = tmp_path / "run.json"
    run_config.write_text(
        json.dumps(
            {
                "model_name_or_path": str(folder / "start"),
                "train_sources": sources,
                "image_column": "jpg",
                "per_device_batch_size": 4,
                "max_steps": 6,
                "warmup_steps": 1,
                "lr_scheduler": "wsd",
                "lr_decay_steps": 2,
                "logging_steps": 1,
                "loss": "sigmoid",
                "lock_image": True,
                "lock_image_unlocked_groups": 1,
                "layer_decay_text": 0.5,
                "log_with": ["none"],
                "save_steps": 3,
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    main([str(run_config)])
    # Interrupted and resumed, the mixed stream replays exactly: the same weights bit for bit.
    interrupted = ["--output_dir", str(tmp_path / "interrupted")]
    main([str(run_config), *interrupted, "--stop_at_step", "3"])
    main([str(run_config), *interrupted, "--resume", "latest"])
    resumed, uninterrupted = (
        load_file(tmp_path / run / "model" / "model.safetensors") for run in ("interrupted", "out")
    )
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    start, tuned = (HfClipModel.from_pretrained(path) for path in (folder / "start", tmp_path / "out" / "model"))
    # Locked: every image-tower tensor but the attention pool (the one unlocked group), BatchNorm statistics too.
    start_state, tuned_state = start.state_dict(), tuned.state_dict()
    for name, tensor in start_state.items():
        locked = name.startswith("vision_model.") and not name.startswith("vision_model.attention_pool.")
        assert torch.equal(tuned_state[name], tensor) == locked, name
    # The sigmoid loss added SigLIP's bias to a softmax checkpoint, trained it and saved it with the model.
    assert start.logit_bias is None and tuned.config.logit_bias_init_value == -10.0
    assert tuned.logit_bias is not None and float(tuned.logit_bias) != -10.0
    records = read_metrics(tmp_path / "out")
    # wsd at 5e-4: warmup 1 step, stable until step 4, cosine decay over the last 2 (logged after each step).
    assert [record["learning_rate"] for record in records] == pytest.approx([5e-4, 5e-4, 5e-4, 5e-4, 2.5e-4, 0.0])
    assert all(math.isfinite(record["loss"]) for record in records)
    # The empty captions are all in the parquet source, and counted there.
    assert records[-1]["skipped/drawings/empty_caption"] > 0 and records[-1]["skipped/photos/empty_caption"] == 0
    assert not (tmp_path / "out" / "logs").exists()  # log_with none: metrics.jsonl only
