"""hf_clip.training and hf_clip.data.streams: data stream (formats, skipping, determinism), optimizer, cached
accumulation, and real `accelerate launch examples/train.py` runs on 2 CPU processes with device JPEG decoding (DDP,
exact resume, saved folder loads in AutoModel and the pipeline); exact resume with the default CPU decoding in one
process. tests/data/test_training_input.py checks the images the two decoding modes produce."""

import functools
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from hf_clip import ClipLoss, HfClipImageProcessor, HfClipModel, HfClipTokenizer, train_clip_bpe
from hf_clip.data.fast_preprocessing import FastClipImagePreprocessor
from hf_clip.data.formats import DataSpec
from hf_clip.data.samples import SKIP_REASONS
from hf_clip.data.streams import ClipBatches, random_crop
from hf_clip.testing_utils import TINY_RESNET, TINY_TEXT, TINY_VIT, tiny_config, two_cpu_processes_launch
from hf_clip.training import TrainConfig, main, parse_config
from hf_clip.training.builders import architecture
from hf_clip.training.objective import ClipObjective
from hf_clip.training.run_folder import read_metrics
from hf_clip.training.steps import ClipEmbedder, build_optimizer, cached_accumulation_backward

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

COLORS = ["red", "green", "blue", "white"]
RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (240, 240, 240)}


def encoded(image: PIL.Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def colour_image(index: int, mode: str = "RGB") -> PIL.Image.Image:
    rng = np.random.default_rng(index)
    pixels = np.clip(np.array(RGB[COLORS[index % 4]]) + rng.integers(-20, 20, (24, 30, 3)), 0, 255)
    return PIL.Image.fromarray(pixels.astype(np.uint8)).convert(mode)


# Per shard: sample index → what is wrong with it (the rest are clean RGB JPEGs).
DAMAGE = {3: "not an image", 5: "truncated", 6: "grayscale", 8: "cmyk", 10: "empty caption"}


def write_shards(folder: Path, num_shards: int = 2, per_shard: int = 24) -> list[str]:
    paths = []
    for shard in range(num_shards):
        path = folder / f"train-{shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(per_shard):
                number = shard * per_shard + index
                image, caption = colour_image(number), f"a photo of a {COLORS[number % 4]} square"
                data = encoded(image, "JPEG")
                damage = DAMAGE.get(index)
                if damage == "not an image":
                    data = b"this is not an image"
                elif damage == "truncated":
                    data = data[: len(data) // 2]
                elif damage == "grayscale":
                    data = encoded(image.convert("L"), "JPEG")
                elif damage == "cmyk":
                    data = encoded(image.convert("CMYK"), "JPEG")
                elif damage == "empty caption":
                    caption = " "
                for suffix, content in (("jpg", data), ("txt", caption.encode()), ("cls", str(number % 4).encode())):
                    member = tarfile.TarInfo(f"sample{number:05d}.{suffix}")
                    member.size = len(content)
                    tar.addfile(member, io.BytesIO(content))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def tokenizer() -> HfClipTokenizer:
    return train_clip_bpe([f"a photo of a {c} square" for c in COLORS] * 4, vocab_size=600, min_frequency=1)


def make_batches(
    spec: DataSpec, tokenizer, batch_size: int = 4, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0
) -> ClipBatches:
    """Unshuffled by default, so which samples land in the dropped partial batch is known."""
    processor = HfClipImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return ClipBatches(
        [spec],
        image_transform=functools.partial(random_crop, FastClipImagePreprocessor(processor)),
        tokenizer=tokenizer,
        batch_size=batch_size,
        seed=0,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
    )


def drain(batches: ClipBatches) -> tuple[list[dict], dict[str, int]]:
    """The full batches, and the skip counts of the whole pass (batches and the closing skip-only record)."""
    records = list(batches)
    skipped = torch.stack([record["skipped"] for record in records]).sum((0, 1)).tolist()  # over records, sources
    return [record for record in records if "pixel_values" in record], dict(zip(SKIP_REASONS, skipped, strict=True))


def test_webdataset_stream_skips_and_counts_damaged_samples(shards, tokenizer):
    spec = DataSpec("webdataset", shards[:1], "jpg", "txt")
    taken, skipped = drain(make_batches(spec, tokenizer, batch_size=4))
    # 24 samples: the undecodable and the truncated image, and the empty caption are dropped; grayscale and CMYK
    # are converted to RGB. 21 usable → 5 full batches (1 left over).
    assert len(taken) == 5
    assert all(batch["pixel_values"].shape == (4, 3, 16, 16) for batch in taken)
    assert skipped == {"bad_image": 2, "empty_caption": 1, "missing_field": 0, "broken_shard": 0, "bad_caption": 0}


def test_parquet_and_imagefolder_with_rgba_and_palette(tmp_path, tokenizer):
    images = [colour_image(i, mode) for i, mode in enumerate(["RGBA", "P", "LA", "RGB", "RGB", "RGB"])]
    encoded_images = [{"bytes": encoded(image, "PNG"), "path": None} for image in images[:5]]
    encoded_images.insert(2, {"bytes": encoded(images[5], "PNG")[:40], "path": None})  # a cut-off PNG
    rows = {"image": encoded_images, "caption": [f"a photo of a {COLORS[i % 4]} square" for i in range(6)]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "data.parquet")
    spec = DataSpec("parquet", [str(tmp_path / "data.parquet")], "image", "caption")
    taken, skipped = drain(make_batches(spec, tokenizer, batch_size=5))
    assert len(taken) == 1 and skipped["bad_image"] == 1
    assert taken[0]["pixel_values"].shape == (5, 3, 16, 16)
    folder = tmp_path / "folder"
    folder.mkdir()
    with (folder / "metadata.jsonl").open("w") as metadata:
        for index, image in enumerate(images[:4]):
            image.save(folder / f"{index}.png")
            metadata.write(json.dumps({"file_name": f"{index}.png", "text": "" if index == 3 else "a square"}) + "\n")
    taken, skipped = drain(make_batches(DataSpec("imagefolder", [str(folder)], "image", "text"), tokenizer, 3))
    assert len(taken) == 1 and skipped["empty_caption"] == 1


def test_truncated_tar_archive_is_not_fatal(shards, tmp_path, tokenizer):
    data = Path(shards[0]).read_bytes()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data[: len(data) // 2])
    taken, skipped = drain(make_batches(DataSpec("webdataset", [str(broken)], "jpg", "txt"), tokenizer, batch_size=2))
    assert len(taken) >= 3  # the samples before the cut still train
    assert skipped["broken_shard"] == 1


def test_stream_is_deterministic_per_epoch_and_split_across_ranks(shards, tokenizer):
    spec = DataSpec("webdataset", shards, "jpg", "txt")
    first, again = make_batches(spec, tokenizer), make_batches(spec, tokenizer)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    next_epoch = make_batches(spec, tokenizer)
    next_epoch.set_epoch(1)
    assert not torch.equal(
        next(iter(next_epoch))["pixel_values"], next(iter(make_batches(spec, tokenizer)))["pixel_values"]
    )
    rank0, rank1 = (make_batches(spec, tokenizer, rank=r, world_size=2) for r in (0, 1))
    assert not torch.equal(next(iter(rank0))["pixel_values"], next(iter(rank1))["pixel_values"])


def test_batch_size_one_is_rejected(shards, tokenizer):
    # The run config is the boundary that knows the loss needs negatives; the data stream only needs a size.
    with pytest.raises(ValueError, match="batch_size must be positive"):
        make_batches(DataSpec("webdataset", shards, "jpg", "txt"), tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="at least 2"):
        TrainConfig(model_config="x", per_device_batch_size=1).validate()


def test_optimizer_follows_the_paper():
    model = HfClipModel(tiny_config())
    optimizer = build_optimizer(model, learning_rate=1e-3, weight_decay=0.2)
    decay, no_decay = sorted(optimizer.param_groups, key=lambda group: -group["weight_decay"])
    assert len(optimizer.param_groups) == 2 and decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.logit_scale) in no_decay_ids
    for name, param in model.named_parameters():
        assert (id(param) in no_decay_ids) == (param.ndim < 2 or name == "logit_scale"), name
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6
    resnet_optimizer = build_optimizer(HfClipModel(tiny_config(vision=TINY_RESNET)), 1e-3, 0.2)
    assert resnet_optimizer.defaults["betas"] == (0.9, 0.999) and resnet_optimizer.defaults["eps"] == 1e-8


def random_micro_batches(count: int, size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(1, TINY_TEXT["bos_token_id"], (size, 8), generator=generator)
        input_ids[:, 0], input_ids[:, -1] = TINY_TEXT["bos_token_id"], TINY_TEXT["eos_token_id"]
        pixel_values = torch.randn(size, 3, TINY_VIT["image_size"], TINY_VIT["image_size"], generator=generator)
        batches.append(
            {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        )
    return batches


def test_cached_accumulation_equals_one_large_batch():
    # float64, so the comparison tests the algebra rather than fp32 summation order (which moves grads by ~1e-6).
    torch.manual_seed(0)
    embedder = ClipEmbedder(HfClipModel(tiny_config())).double()
    micro_batches = [
        {name: t.double() if t.is_floating_point() else t for name, t in batch.items()}
        for batch in random_micro_batches(count=3, size=4)
    ]
    whole = {name: torch.cat([batch[name] for batch in micro_batches]) for name in micro_batches[0]}
    reference_loss = ClipObjective(embedder, ClipLoss())(whole).loss
    reference_loss.backward()
    reference = {name: param.grad.clone() for name, param in embedder.named_parameters()}
    embedder.zero_grad()
    loss = cached_accumulation_backward(ClipObjective(embedder, ClipLoss()), micro_batches)
    torch.testing.assert_close(loss, reference_loss.detach(), atol=1e-12, rtol=0)
    for name, param in embedder.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], atol=1e-10, rtol=0, msg=name)
    # Plain accumulation (each micro-batch its own problem) is a different objective: the check above can fail.
    plain = sum(ClipObjective(embedder, ClipLoss())(batch).loss for batch in micro_batches) / 3
    assert abs(float(plain.detach()) - float(reference_loss.detach())) > 1e-3


def test_fsdp_wraps_the_layers_the_model_names():
    """What FSDP needs from us, checked without GPUs: accelerate 1.15 runs FSDP only on accelerators (with
    ACCELERATE_USE_CPU it falls back to MULTI_CPU data parallel), so a 2-process CPU FSDP launch is not possible."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    embedder = ClipEmbedder(HfClipModel(tiny_config()))
    assert embedder._no_split_modules == ["HfClipEncoderLayer"]  # no ResNet block in a ViT model
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(embedder)
    wrapped = [
        name
        for name, module in embedder.named_modules()
        if plugin.auto_wrap_policy(module, recurse=False, nonwrapped_numel=0)
    ]
    layers = [name for name, module in embedder.named_modules() if type(module).__name__ == "HfClipEncoderLayer"]
    assert wrapped == layers and len(layers) == 4


# --- real launches -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory, shards, tokenizer) -> dict:
    folder = tmp_path_factory.mktemp("run")
    tokenizer.save_pretrained(folder / "tokenizer")
    model_config = {
        "projection_dim": 16,
        "text_config": TINY_TEXT,
        "vision_config": TINY_VIT,
    }
    (folder / "model.json").write_text(json.dumps(model_config))
    training = [
        "--model_config", str(folder / "model.json"), "--tokenizer_name_or_path", str(folder / "tokenizer"),
        "--train_data_files", *shards,
        "--per_device_batch_size", "3", "--gradient_accumulation_steps", "2", "--max_steps", "4",
        "--warmup_steps", "1", "--logging_steps", "1", "--save_steps", "2", "--max_grad_norm", "1.0",
    ]  # fmt: skip
    evaluation = [
        "--eval_data_files", shards[1], "--class_names", *COLORS,
        "--templates", "a photo of a {c} square", "a {c} square",
    ]  # fmt: skip
    # The launches decode JPEGs on the (CPU) device; the one-process resume test runs the default CPU decoding.
    return {"folder": folder, "training": training, "args": [*training, *evaluation, "--image_decoding", "device"]}


def launch(args: list[str], output_dir: Path) -> subprocess.CompletedProcess:
    # ACCELERATE_USE_CPU + --multi_gpu is how accelerate starts N gloo CPU processes (`--cpu --num_processes 2`
    # starts one process; `--multi_gpu` alone starts independent copies).
    command = [*two_cpu_processes_launch(), str(EXAMPLES / "train.py"), "--output_dir", str(output_dir), *args]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def full_run(run_setup) -> Path:
    output_dir = run_setup["folder"] / "full"
    launch(run_setup["args"], output_dir)
    return output_dir


def test_two_process_run_reports_skips_and_logs(full_run):
    records = read_metrics(full_run)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    last = records[-1]
    # Each rank reads one shard of 24 samples (2 undecodable images, the truncated JPEG caught by the workers' check,
    # and 1 empty caption; grayscale JPEGs train decoded on the device, CMYK ones decoded in the workers) and needs
    # 4 steps × 2 micro-batches × 3 = 24 usable ones: it passes its whole shard and starts a second epoch.
    assert last["skipped/bad_image"] >= 2 * 2 and last["skipped/empty_caption"] >= 2 * 1
    assert last["skipped/missing_field"] == last["skipped/broken_shard"] == 0
    assert last["skipped_samples"] == sum(last[f"skipped/{reason}"] for reason in SKIP_REASONS)
    assert 0.0 <= last["zero_shot_top1"] <= 1.0 and "zero_shot_top1_ensemble" in last
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(full_run / "logs")).Reload()
    for tag in ("loss", "learning_rate", "logit_scale", "samples_per_second", "skipped_samples"):
        assert len(events.Scalars(tag)) == 4, tag


def test_saved_folder_loads_in_auto_classes_and_pipeline(full_run):
    from transformers import AutoModel, AutoProcessor, pipeline

    model = AutoModel.from_pretrained(full_run / "model")
    processor = AutoProcessor.from_pretrained(full_run / "model")
    assert isinstance(model, HfClipModel) and model.config.vision_config.image_size == TINY_VIT["image_size"]
    assert processor.tokenizer.model_max_length == TINY_TEXT["max_position_embeddings"] == 16
    classifier = pipeline("zero-shot-image-classification", model=str(full_run / "model"))
    scores = classifier(colour_image(0), candidate_labels=COLORS)
    assert sorted(score["label"] for score in scores) == sorted(COLORS)
    assert abs(sum(score["score"] for score in scores) - 1) < 1e-5


def test_resume_is_bitwise_exact(run_setup, full_run):
    output_dir = run_setup["folder"] / "interrupted"
    launch([*run_setup["args"], "--stop_at_step", "2"], output_dir)
    assert not (output_dir / "model").exists()
    launch([*run_setup["args"], "--resume", "latest"], output_dir)
    resumed, uninterrupted = (load_file(path / "model" / "model.safetensors") for path in (output_dir, full_run))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    # The comparison can fail: the step-2 checkpoint differs from the final weights.
    early = load_file(full_run / "checkpoints" / "step_00000002" / "model.safetensors")
    assert not torch.equal(early["model.logit_scale"], uninterrupted["logit_scale"]) or not torch.equal(
        early["model.text_projection.weight"], uninterrupted["text_projection.weight"]
    )


def test_cpu_decoding_resume_is_bitwise_exact_in_one_process(run_setup, tmp_path):
    """The default input path (workers decode with the fast exact preprocessing) resumes exactly too."""
    main([*run_setup["training"], "--output_dir", str(tmp_path / "full")])
    main([*run_setup["training"], "--output_dir", str(tmp_path / "interrupted"), "--stop_at_step", "2"])
    main([*run_setup["training"], "--output_dir", str(tmp_path / "interrupted"), "--resume", "latest"])
    resumed, uninterrupted = (
        load_file(tmp_path / run / "model" / "model.safetensors") for run in ("interrupted", "full")
    )
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    early = load_file(tmp_path / "full" / "checkpoints" / "step_00000002" / "model.safetensors")
    assert not torch.equal(early["model.text_projection.weight"], uninterrupted["text_projection.weight"])


def test_config_from_json_with_command_line_overrides(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_config": "ViT-B-32", "max_steps": 7, "templates": ["a {c}", "the {c}"]}))
    config = parse_config([str(path), "--max_steps", "9"])
    assert (config.model_config, config.max_steps, config.templates) == ("ViT-B-32", 9, ["a {c}", "the {c}"])
    path.write_text(json.dumps({"model_config": "ViT-B-32", "max_step": 7}))
    with pytest.raises(ValueError, match="max_step"):
        parse_config([str(path)])
    # A relative architecture file in a run config is read beside the run config, whatever the working directory.
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "model.json").write_text(tiny_config().to_json_string())
    (tmp_path / "runs" / "run.json").write_text(json.dumps({"model_config": "model.json"}))
    config = parse_config([str(tmp_path / "runs" / "run.json")])
    assert config.model_config == str(tmp_path / "runs" / "model.json")
    tokenizer = train_clip_bpe(["a red square", "a blue square"] * 10, vocab_size=600)
    model_config = architecture(config, tokenizer)
    assert model_config.vision_config.image_size == TINY_VIT["image_size"]
    assert model_config.text_config.vocab_size == len(tokenizer)
    assert model_config.text_config.eos_token_id == tokenizer.eos_token_id
    # A published name comes from the package's architectures.
    published = architecture(TrainConfig(model_config="ViT-B-32"), tokenizer)
    assert published.vision_config.patch_size == 32 and published.text_config.vocab_size == len(tokenizer)


def test_fine_tune_from_the_saved_folder(full_run, shards, tmp_path):
    """`model_name_or_path`: weights, tokenizer and image size come from the folder; one in-process step."""
    arguments = ["--model_name_or_path", str(full_run / "model"), "--output_dir", str(tmp_path), "--warmup_steps", "0"]
    main([*arguments, "--train_data_files", *shards, "--per_device_batch_size", "3", "--max_steps", "1"])
    tuned, start = (HfClipModel.from_pretrained(path) for path in (tmp_path / "model", full_run / "model"))
    assert tuned.config.to_dict()["text_config"] == start.config.to_dict()["text_config"]
    assert not torch.equal(tuned.text_projection.weight, start.text_projection.weight)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_tiled_loss_run_reproduces_the_dense_run(run_setup, tmp_path, loss):
    """`--loss_tile_size` (here 4, not dividing the accumulated batch of 6) trains as the dense loss does: the same
    losses step for step, through cached accumulation."""
    losses = {}
    for name, extra in (("dense", []), ("tiled", ["--loss_tile_size", "4"])):
        output_dir = tmp_path / name
        main([*run_setup["training"], "--loss", loss, "--output_dir", str(output_dir), *extra])
        records = read_metrics(output_dir)
        losses[name] = torch.tensor([record["loss"] for record in records if "loss" in record])
    assert len(losses["dense"]) == 4
    torch.testing.assert_close(losses["tiled"], losses["dense"], atol=1e-5, rtol=0)
