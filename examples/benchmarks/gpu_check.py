"""The one command a session runs when it is lent a GPU (`make gpu-check`), and its CPU dry run (`--device cpu`).

Stages, in order of priority; each runs in its own process with what is left of `--budget` seconds and appends its
results as JSON rows to `OUTPUT/gpu_check.jsonl` as soon as they are known, so a run stopped at its limit keeps
everything it measured (a stage cut off is recorded as such):

1. `correctness`: `examples/train.py` for 30 steps (bf16 and the compiled step on CUDA) on generated JPEG
   webdataset shards holding a few corrupt samples, checkpoints every 10 steps; a second run resumed from the step-20
   checkpoint must log the same loss at step 30; the output folder loads with AutoModel and runs the zero-shot
   pipeline on the device; and the steady-state training step runs under `torch.cuda.set_sync_debug_mode("error")`
   (any device→host synchronisation raises).
2. `vit-b32`: `benchmark.py` on ViT-B/32 at batch 512: hf_clip, transformers' CLIPModel and open_clip compiled, in
   one run, on the anchor batch and on captions capped at 32 tokens; transformers eager for the memory baseline.
3. `vit-l14`: the same at batch 128.
4. `end-to-end`: `examples/train.py` images/s from JPEG shards (16 workers) beside the step rate of stage 2.
5. `fine-tuning`: `examples/train.py` from stage 1's model with the options that change the compiled step (sigmoid
   loss with its new bias, patch dropout, the image tower locked but for its head, layer-wise decay on the text
   tower, the warmup–stable–decay schedule); the locked tensors must come back bit-identical, the others trained.

    python examples/benchmarks/gpu_check.py --output $OUT/gpu_check                 # on the GPU machine
    python examples/benchmarks/gpu_check.py --device cpu --output /tmp/gpu_check    # dry run: tiny configs, CPU

On CPU every stage runs the same code on tiny configurations and a few steps (the sync check needs CUDA and is
recorded as skipped).
"""

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hf_clip.synthetic import jpeg_bytes, photo_like, write_webdataset_shard
from hf_clip.training.run_folder import read_metrics

BENCHMARKS = Path(__file__).resolve().parent
EXAMPLES = BENCHMARKS.parent
# Caption words of the generated shards.
WORDS = ("red", "green", "blue", "small", "large", "dog", "cat", "car", "tree", "house", "boat", "bird", "street")


@dataclass(frozen=True)
class Scale:
    """What each stage runs at: the real sizes on CUDA, tiny ones for the CPU dry run."""

    architectures: dict[str, int]  # benchmark architecture → batch size
    train_model: str
    train_batch: int
    train_steps: int
    photo_side: tuple[int, int]  # range of the generated photos' long side
    shards: int
    samples_per_shard: int
    workers: int
    benchmark_steps: int
    benchmark_variant: str  # compiling on CPU would take most of the dry run's time


CUDA_SCALE = Scale({"ViT-B-32": 512, "ViT-L-14": 128}, "ViT-B-32", 256, 30, (375, 1024), 16, 256, 16, 20, "compile")
# Correctness needs the real code path, not the real sizes: a small model compiles in seconds and small photos
# generate fast, which keeps the stage within its two minutes.
CUDA_CORRECTNESS_SCALE = replace(
    CUDA_SCALE,
    train_model=str(BENCHMARKS / "tiny-vit.json"),
    train_batch=32,
    photo_side=(64, 320),
    shards=4,
    samples_per_shard=64,
    workers=4,
)
CPU_SCALE = Scale(
    {str(BENCHMARKS / "tiny-vit.json"): 8}, str(BENCHMARKS / "tiny-vit.json"), 8, 6, (40, 96), 2, 24, 1, 2, "eager"
)


class Rows:
    """`gpu_check.jsonl`: one JSON object per line, appended and flushed as each result is known."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, stage: str, **row: object) -> None:
        record = {"stage": stage, **row}
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def _photo(arguments: tuple[int, int, int]) -> bytes:
    seed, low, high = arguments
    rng = np.random.default_rng(seed)
    long_side = int(rng.integers(low, high + 1))
    short_side = max(32, int(long_side / rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9])))
    size = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
    return jpeg_bytes(photo_like(*size, rng))


def write_shards(folder: Path, scale: Scale, corrupt: bool) -> list[str]:
    """JPEG shards with random-word captions; with `corrupt`, each shard also holds a truncated JPEG, bytes that are
    no image and an empty caption (the training stream must skip and count them)."""
    folder.mkdir(parents=True, exist_ok=True)
    count = scale.shards * scale.samples_per_shard
    with multiprocessing.Pool(min(16, os.cpu_count() or 1)) as pool:
        jpegs = pool.map(_photo, [(seed, *scale.photo_side) for seed in range(count)])
    rng = np.random.default_rng(0)
    paths = []
    for shard in range(scale.shards):
        samples = []
        for index in range(shard * scale.samples_per_shard, (shard + 1) * scale.samples_per_shard):
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
            samples.append((f"s{index:06d}", {"jpg": jpegs[index], "txt": caption.encode()}))
        if corrupt:
            samples.append((f"bad{shard}-truncated", {"jpg": jpegs[0][: len(jpegs[0]) // 3], "txt": b"a photo"}))
            samples.append((f"bad{shard}-not-an-image", {"jpg": b"no image here", "txt": b"a photo"}))
            samples.append((f"bad{shard}-empty-caption", {"jpg": jpegs[1], "txt": b" "}))
        path = folder / f"shard-{shard:03d}.tar"
        write_webdataset_shard(path, samples)
        paths.append(str(path))
    return paths


def run(command: list[str], deadline: float, log: Path) -> subprocess.CompletedProcess:
    """`command` with the time left before `deadline`; its output goes to `log`. Raises TimeoutError at the limit."""
    remaining = deadline - time.monotonic()
    if remaining < 5:
        raise TimeoutError("no time left for this stage")
    with log.open("w") as output:
        try:
            return subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, timeout=remaining, check=False)
        except subprocess.TimeoutExpired as error:
            raise TimeoutError(f"stopped at the time limit after {remaining:.0f} s") from error


def train_command(scale: Scale, device: str, shards: list[str], output_dir: Path, model: list[str]) -> list[str]:
    """`examples/train.py` on `shards`; `model` names what it trains: `new_model(scale, tokenizer)` or
    `["--model_name_or_path", folder]`."""
    command = [sys.executable, str(EXAMPLES / "train.py"), "--output_dir", str(output_dir), *model]
    command += ["--train_data_files", *shards, "--per_device_batch_size", str(scale.train_batch)]
    command += ["--max_steps", str(scale.train_steps), "--warmup_steps", "2", "--logging_steps", "1"]
    command += ["--dataloader_num_workers", str(scale.workers), "--shuffle_buffer", "64"]
    if device == "cuda":
        command += ["--mixed_precision", "bf16", "--image_decoding", "device"]
    return command


def new_model(scale: Scale, tokenizer: Path) -> list[str]:
    return ["--model_config", scale.train_model, "--tokenizer_name_or_path", str(tokenizer)]


def metrics(output_dir: Path) -> list[dict]:
    return read_metrics(output_dir)


def correctness(args: argparse.Namespace, scale: Scale, rows: Rows, deadline: float) -> None:
    from hf_clip import train_clip_bpe

    work = args.work / "correctness"
    shards = write_shards(work / "shards", scale, corrupt=True)
    captions = [" ".join(WORDS)] * 20 + list(WORDS)
    tokenizer = work / "tokenizer"
    train_clip_bpe(captions, vocab_size=600).save_pretrained(tokenizer)
    base = train_command(scale, args.device, shards, work / "full", new_model(scale, tokenizer))
    checkpoint_every = max(1, scale.train_steps // 3)
    run([*base, "--save_steps", str(checkpoint_every)], deadline, work / "full.log").check_returncode()
    full = metrics(work / "full")
    rows.add("correctness", check="train", steps=full[-1]["step"], loss_first=full[0]["loss"],
             loss_last=full[-1]["loss"], skipped=full[-1]["skipped_samples"],
             skipped_by_reason={k: v for k, v in full[-1].items() if k.startswith("skipped/")})  # fmt: skip

    resume_step = 2 * checkpoint_every
    resumed_dir = work / "resumed"
    checkpoint = work / "full" / "checkpoints" / f"step_{resume_step:08d}"
    shutil.copytree(checkpoint, resumed_dir / "checkpoints" / checkpoint.name)
    resume = [
        *train_command(scale, args.device, shards, resumed_dir, new_model(scale, tokenizer)),
        "--resume",
        "latest",
    ]
    run(resume, deadline, work / "resumed.log").check_returncode()
    expected, got = full[-1]["loss"], metrics(resumed_dir)[-1]["loss"]
    rows.add("correctness", check="resume", resumed_at=resume_step, step=full[-1]["step"], loss_uninterrupted=expected,
             loss_resumed=got, abs_difference=abs(expected - got), exact=expected == got)  # fmt: skip

    run([sys.executable, __file__, "--stage", "load", "--device", args.device, "--work", str(work / "full" / "model")],
        deadline, work / "load.log").check_returncode()  # fmt: skip
    rows.add("correctness", **json.loads((work / "full" / "model" / "load_check.json").read_text()))
    if args.device != "cuda":
        rows.add("correctness", check="sync_debug", skipped="needs CUDA")
        return
    run([sys.executable, __file__, "--stage", "sync", "--device", args.device, "--work", str(work)], deadline,
        work / "sync.log").check_returncode()  # fmt: skip
    rows.add("correctness", **json.loads((work / "sync_check.json").read_text()))


def load_check(model_dir: Path, device: str) -> None:
    """The trained folder through AutoModel and the zero-shot pipeline on `device` (run in a fresh process)."""
    import PIL.Image
    from transformers import AutoModel, pipeline

    import hf_clip  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    classifier = pipeline("zero-shot-image-classification", model=str(model_dir), device=device)
    image = PIL.Image.new("RGB", (64, 48), (200, 30, 30))
    scores = classifier(image, candidate_labels=["red", "green", "blue"])
    total = sum(score["score"] for score in scores)
    result = {"check": "load", "model": type(model).__name__, "device": str(next(model.parameters()).device),
              "pipeline_labels": len(scores), "pipeline_score_sum": total, "ok": abs(total - 1) < 1e-3}  # fmt: skip
    (model_dir / "load_check.json").write_text(json.dumps(result))


def sync_check(work: Path, device: str) -> None:
    """Steady-state training steps (fused AdamW, compiled forward + loss, bf16) with device→host syncs forbidden."""
    import torch

    from hf_clip import ClipLoss, HfClipConfig, HfClipModel
    from hf_clip.data.batches import device_text
    from hf_clip.synthetic import random_captions
    from hf_clip.training.objective import ClipObjective
    from hf_clip.training.steps import ClipEmbedder, build_optimizer, clamp_logit_scale_

    config = HfClipConfig.from_json_file(BENCHMARKS / "tiny-vit.json")
    text, vision = config.tower_configs()
    model: HfClipModel = HfClipModel._from_config(config).to(torch.device(device))
    model.train()
    objective = ClipObjective(ClipEmbedder(model), ClipLoss())
    optimizer = build_optimizer(model, 1e-4, 0.2)
    step_objective = torch.compile(objective.__call__)
    input_ids, attention_mask = random_captions(32, text.max_position_embeddings, text.bos_token_id or 0,
                                                text.eos_token_id, min_length=6)  # fmt: skip
    size = vision.image_size
    text_batch = device_text({"input_ids": input_ids, "attention_mask": attention_mask}, torch.device(device))
    batch = {"pixel_values": torch.randn(32, 3, size, size, device=device), **text_batch}

    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = step_objective(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale_(model)
        return loss.detach()

    for _ in range(3):  # compilation and the first-call set-up may synchronise
        step()
    torch.cuda.synchronize()
    error = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    except RuntimeError as raised:
        error = str(raised)[:500]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    result = {"check": "sync_debug", "steps": 5, "ok": error is None, "error": error}
    (work / "sync_check.json").write_text(json.dumps(result))


def throughput(
    args: argparse.Namespace, scale: Scale, rows: Rows, deadline: float, stage: str, architecture: str
) -> None:
    batch = scale.architectures[architecture]
    name = Path(architecture).stem
    common = [sys.executable, str(BENCHMARKS / "benchmark.py"), "--device", args.device, "--arch", architecture,
              "--batch-size", str(batch), "--no-encode", "--steps", str(scale.benchmark_steps)]  # fmt: skip
    peers = ["--impls", "hf_clip,transformers,open_clip", "--variants", scale.benchmark_variant]
    runs = {"anchor-captions": peers}
    if args.device == "cuda":  # the dry run checks the code path once
        runs = {
            "eager-transformers": ["--impls", "transformers", "--variants", "eager"],
            **runs,
            "short-captions": [*peers, "--longest-caption", "32"],
        }
    for label, extra in runs.items():
        output = args.work / f"{name}-{label}"
        try:
            run([*common, *extra, "--output", str(output)], deadline, args.work / f"{name}-{label}.log")
        finally:
            # Rows measured before a stop are kept: benchmark.py appends each one as soon as it is measured.
            progress = Path(f"{output}.jsonl")
            for line in progress.read_text().splitlines() if progress.exists() else []:
                rows.add(stage, run=label, **json.loads(line))


def end_to_end(args: argparse.Namespace, scale: Scale, rows: Rows, deadline: float) -> None:
    from hf_clip import train_clip_bpe

    work = args.work / "end-to-end"
    shards = write_shards(work / "shards", scale, corrupt=False)
    tokenizer = work / "tokenizer"
    train_clip_bpe([" ".join(WORDS)] * 20 + list(WORDS), vocab_size=600).save_pretrained(tokenizer)
    command = train_command(scale, args.device, shards, work / "run", new_model(scale, tokenizer))
    run(command, deadline, work / "train.log").check_returncode()
    logged = metrics(work / "run")
    steady = [record["samples_per_second"] for record in logged[len(logged) // 3 :]]  # after compilation
    rows.add("end-to-end", images_per_second=float(np.median(steady)), batch=scale.train_batch,
             workers=scale.workers, model=scale.train_model, steps=logged[-1]["step"])  # fmt: skip


# Options of the fine-tuning stage: every one changes the compiled training step.
FINE_TUNING_OPTIONS = [
    "--loss", "sigmoid", "--patch_dropout", "0.5", "--lock_image", "true", "--lock_image_unlocked_groups", "1",
    "--layer_decay_text", "0.8", "--lr_scheduler", "wsd", "--lr_decay_steps", "2",
]  # fmt: skip


def fine_tuning(args: argparse.Namespace, scale: Scale, rows: Rows, deadline: float) -> None:
    from safetensors.torch import load_file

    correctness_work = args.work / "correctness"
    start = correctness_work / "full" / "model"
    if not (start / "model.safetensors").is_file():
        raise FileNotFoundError(f"the fine-tuning stage starts from the correctness stage's model: {start} is missing")
    shards = sorted(str(path) for path in (correctness_work / "shards").glob("*.tar"))
    output_dir = args.work / "fine-tuning"
    command = train_command(scale, args.device, shards, output_dir, ["--model_name_or_path", str(start)])
    run([*command, *FINE_TUNING_OPTIONS], deadline, args.work / "fine-tuning.log").check_returncode()
    logged = metrics(output_dir)
    before, after = load_file(start / "model.safetensors"), load_file(output_dir / "model" / "model.safetensors")
    # The image tower's head (post-LayerNorm and projection) is its one unlocked group.
    locked = [name for name in before if name.startswith("vision_model.") and "post_layernorm" not in name]
    trained = [name for name in before if name not in locked]
    steady = [record["samples_per_second"] for record in logged[len(logged) // 3 :]]  # after compilation
    rows.add("fine-tuning", steps=logged[-1]["step"], loss_first=logged[0]["loss"], loss_last=logged[-1]["loss"],
             losses_finite=all(np.isfinite(record["loss"]) for record in logged),
             locked_unchanged=all(bool((before[name] == after[name]).all()) for name in locked),
             trained_changed=sum(not bool((before[name] == after[name]).all()) for name in trained),
             trained_tensors=len(trained), logit_bias=float(after["logit_bias"]),
             images_per_second=float(np.median(steady)),
             options=" ".join(FINE_TUNING_OPTIONS))  # fmt: skip


def loss_memory(args: argparse.Namespace, rows: Rows) -> None:
    from loss_memory import device_points  # this folder's loss benchmark (examples/benchmarks/loss_memory.py)

    batches = [4096, 16384, 32768, 65536, 262144] if args.device == "cuda" else [256]
    for row in device_points(
        args.device, batches, dim=512, tile_size=4096 if args.device == "cuda" else 64, limit_gb=40
    ):
        rows.add("loss-memory", **row)


STAGES = ("correctness", "vit-b32", "vit-l14", "end-to-end", "fine-tuning", "loss-memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--output", type=Path, default=Path("gpu_check"), help="folder of gpu_check.jsonl")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all stages together")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: OUTPUT/work)")
    parser.add_argument("--stage", choices=("load", "sync"), help=argparse.SUPPRESS)  # the checks' own processes
    args = parser.parse_args()
    if args.stage == "load":
        return load_check(args.work, args.device)
    if args.stage == "sync":
        return sync_check(args.work, args.device)
    deadline = time.monotonic() + args.budget
    args.work = args.work or args.output / "work"
    scale = CUDA_SCALE if args.device == "cuda" else CPU_SCALE
    rows = Rows(args.output / "gpu_check.jsonl")
    rows.add("env", device=args.device, budget_s=args.budget, command=" ".join(sys.argv),
             date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
    architectures = list(scale.architectures)
    stages = {
        "correctness": lambda: correctness(
            args, CUDA_CORRECTNESS_SCALE if args.device == "cuda" else scale, rows, deadline
        ),
        "vit-b32": lambda: throughput(args, scale, rows, deadline, "vit-b32", architectures[0]),
        "vit-l14": lambda: throughput(args, scale, rows, deadline, "vit-l14", architectures[-1]),
        "end-to-end": lambda: end_to_end(args, scale, rows, deadline),
        "fine-tuning": lambda: fine_tuning(
            args, CUDA_CORRECTNESS_SCALE if args.device == "cuda" else scale, rows, deadline
        ),
        "loss-memory": lambda: loss_memory(args, rows),
    }
    for stage in args.stages.split(","):
        if args.device == "cpu" and stage == "vit-l14":
            continue  # one tiny architecture stands for both on CPU
        started = time.monotonic()
        try:
            stages[stage]()
            rows.add(stage, done=True, seconds=time.monotonic() - started)
        except (TimeoutError, subprocess.CalledProcessError, OSError, KeyError, ValueError) as error:
            rows.add(stage, done=False, seconds=time.monotonic() - started, error=repr(error)[:500])


if __name__ == "__main__":
    main()
