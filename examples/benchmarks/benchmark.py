"""Training-step and image-encoding throughput of hf_clip beside transformers' CLIPModel and open_clip, in one run.

The measuring method is the one the peers' GPU anchor figures were taken with (`docs/performance.md`), so rows sit
beside them: random weights, the same synthetic batch for every implementation (random pixels, 77-token captions
with EOS at a random position 5-75, zero padding), bf16 autocast and fused AdamW on CUDA (fp32 and plain AdamW on
CPU), median of `--steps` timed steps after `--warmup`, FLOPs of forward + loss + backward from `FlopCounterMode`,
MFU against a measured matmul ceiling (bf16 8192² on CUDA, fp32 on CPU), peak memory (CUDA: allocated; CPU:
process peak RSS above the start).

    python examples/benchmarks/benchmark.py --device cuda --arch ViT-B-32 --batch-size 512 --variants eager,compile
    python examples/benchmarks/benchmark.py --device cpu --arch examples/benchmarks/tiny-vit.json --batch-size 8

Before timing, the optimised hf_clip step's loss and gradients are compared with the unoptimised path
(`hf_clip-plain`, eager): on CPU in fp32 the loss within 1e-5 and the gradients within 1e-5 relative L2; under
CUDA bf16 autocast both within bf16's relative 1.6e-2.
"""

import argparse
import contextlib
import datetime
import functools
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from implementations import BUILDERS, Implementation, ImplementationUnavailable
from report import environment, markdown_table, write_results
from torch.utils.flop_counter import FlopCounterMode

from hf_clip import HfClipConfig
from hf_clip.synthetic import random_captions

# The batch sizes of the peers' anchor figures.
DEFAULT_BATCH = {"ViT-B-32": 512, "ViT-B-16": 256, "ViT-L-14": 128, "RN50": 256}
BF16_RTOL = 1.6e-2  # torch.testing's default relative tolerance for bfloat16
# fp32: loss within 1e-5 and all gradients within 1e-5 in relative L2 norm. Compiling alone (inductor reorders
# reductions) moves fp32 gradients by ~5e-6 relative, so an elementwise 1e-5 test would flag the compiler itself.
FP32_TOL = 1e-5


def load_config(arch: str) -> HfClipConfig:
    """A published architecture name (`HfClipConfig.from_architecture`) or a path to an hf_clip config JSON."""
    if arch.endswith(".json"):
        return HfClipConfig.from_json_file(arch)
    return HfClipConfig.from_architecture(arch)


def synthetic_batch(
    batch_size: int, config: HfClipConfig, device: torch.device, longest_caption: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The anchors' batch: random pixels and 77-column captions with EOS at a random position 5..75.

    `longest_caption` (tokens with BOS and EOS) caps the caption length for batches of short real-world captions;
    every implementation still receives the 77-column padded batch."""
    text, vision = config.tower_configs()
    context, size = text.max_position_embeddings, vision.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, device=device)
    longest = context - 1 if longest_caption is None else min(longest_caption, context - 1)
    if longest < 2:
        raise ValueError(f"longest_caption must be at least 2 tokens (BOS and EOS), got {longest_caption}.")
    input_ids, attention_mask = random_captions(
        batch_size, context, text.bos_token_id or 0, text.eos_token_id, min_length=min(6, longest), max_length=longest
    )
    return pixel_values, input_ids.to(device), attention_mask.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> tuple[float, float, float]:
    """Median, min and max seconds of `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def matmul_ceiling(device: torch.device, size: int) -> float:
    """Measured FLOP/s of one square matmul: bf16 on CUDA (the tensor-core ceiling), fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    median, _, _ = timed(lambda: a @ b, 20 if device.type == "cuda" else 5, 5 if device.type == "cuda" else 1, device)
    return 2 * size**3 / median


def _resident_peak_kib() -> int:
    match = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    if match is None:
        raise OSError("no VmHWM in /proc/self/status")
    return int(match.group(1))


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak bytes in the block: CUDA allocator peak, or on CPU the rise of the process's peak RSS (Linux)."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        yield result
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start = _resident_peak_kib()
    except OSError:
        yield result
        return
    yield result
    result["peak_mem_gb"] = (_resident_peak_kib() - start) / 2**20


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(name: str, config: HfClipConfig, device: torch.device) -> Implementation:
    # Every implementation's step closure shares its code object across builds: without a reset, dynamo's cache
    # limit would silently send later compiled rows back to eager.
    torch._dynamo.reset()
    torch.manual_seed(0)
    return BUILDERS[name](config, device)


def train_row(name: str, config: HfClipConfig, batch, variant: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    impl = build(name, config, device)
    model = impl.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    pixel_values = impl.prepare_pixels(batch[0])
    input_ids, attention_mask = impl.prepare_text(batch[1], batch[2])
    loss_fn = impl.loss
    if variant == "compile":
        loss_fn = torch.compile(impl.loss, mode=args.compile_mode, backend=args.compile_backend)

    def step() -> None:
        with autocast(device):
            loss = loss_fn(pixel_values, input_ids, attention_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        with autocast(device):
            loss = impl.loss(pixel_values, input_ids, attention_mask)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    warmup = args.warmup + (3 if variant == "compile" else 0)
    with peak_memory(device) as memory:
        median, low, high = timed(step, args.steps, warmup, device)
    batch_size = pixel_values.shape[0]
    return {
        "step_s": median,
        "step_min": low,
        "step_max": high,
        "samples_per_s": batch_size / median,
        "flops_per_step": flops,
        "tflops": flops / median / 1e12,
        "text_len": input_ids.shape[1],
        **memory,
    }


def encode_row(name: str, config: HfClipConfig, batch_size: int, variant: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    impl = build(name, config, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impl.model.eval().to(dtype)
    size = config.tower_configs()[1].image_size
    pixel_values = impl.prepare_pixels(torch.randn(batch_size, 3, size, size, device=device, dtype=dtype))
    encode = impl.encode
    if variant == "compile":
        encode = torch.compile(impl.encode, mode=args.compile_mode, backend=args.compile_backend)
    with torch.inference_mode():
        median, low, high = timed(lambda: encode(pixel_values), args.steps, args.warmup, device)
    return {"step_s": median, "step_min": low, "step_max": high, "images_per_s": batch_size / median}


def _loss_and_grads(impl: Implementation, batch, loss_fn, device: torch.device) -> tuple[float, torch.Tensor]:
    pixel_values = impl.prepare_pixels(batch[0])
    input_ids, attention_mask = impl.prepare_text(batch[1], batch[2])
    impl.model.zero_grad(set_to_none=True)
    with autocast(device):
        loss = loss_fn(pixel_values, input_ids, attention_mask)
    loss.backward()
    grads = [p.grad.float().flatten() for p in impl.model.parameters() if p.grad is not None]
    return float(loss.detach()), torch.cat(grads)


def exactness(config: HfClipConfig, batch, variant: str, args: argparse.Namespace) -> dict:
    """Loss and gradients of the optimised hf_clip step against the unoptimised path, on the same weights."""
    device = torch.device(args.device)
    optimised, plain = build("hf_clip", config, device), build("hf_clip-plain", config, device)
    plain.model.load_state_dict(optimised.model.state_dict())
    loss_fn = optimised.loss
    if variant == "compile":
        loss_fn = torch.compile(optimised.loss, mode=args.compile_mode, backend=args.compile_backend)
    loss, grads = _loss_and_grads(optimised, batch, loss_fn, device)
    reference_loss, reference_grads = _loss_and_grads(plain, batch, plain.loss, device)
    loss_diff = abs(loss - reference_loss)
    grad_max_diff = float((grads - reference_grads).abs().max())
    grad_rel_diff = float((grads - reference_grads).norm() / reference_grads.norm())
    if device.type == "cuda":
        exact = loss_diff <= BF16_RTOL * abs(reference_loss) and grad_rel_diff <= BF16_RTOL
        tolerance = f"bf16: relative {BF16_RTOL}"
    else:
        exact = loss_diff <= FP32_TOL and grad_rel_diff <= FP32_TOL
        tolerance = f"fp32: loss {FP32_TOL}, gradients {FP32_TOL} relative L2"
    return {
        "exact": exact,
        "tolerance": tolerance,
        "loss_abs_diff": loss_diff,
        "grad_max_abs_diff": grad_max_diff,
        "grad_rel_l2_diff": grad_rel_diff,
    }


def run_safely(fn: Callable[[], dict]) -> dict:
    """A row that cannot run (implementation missing, out of memory) is recorded with its error; the run goes on."""
    try:
        return fn()
    except ImplementationUnavailable as error:
        return {"error": str(error)}
    except (RuntimeError, torch.OutOfMemoryError) as error:
        return {"error": repr(error)[:400]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="ViT-B-32,ViT-L-14", help="comma-separated names or config JSON paths")
    parser.add_argument("--batch-size", type=int, help="training batch (default: the peers' per architecture)")
    parser.add_argument("--encode-batch-size", type=int, default=512)
    parser.add_argument(
        "--longest-caption", type=int, help="cap caption length (tokens incl. BOS/EOS; default: the anchors' 76)"
    )
    parser.add_argument("--impls", default="hf_clip,hf_clip-plain,transformers,open_clip")
    parser.add_argument("--variants", default="eager,compile", help="eager and/or compile")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, help="ceiling matmul size (default 8192 CUDA, 1024 CPU)")
    parser.add_argument("--no-encode", action="store_true")
    parser.add_argument(
        "--output", default="benchmark_results", help="writes OUTPUT.jsonl (row by row), OUTPUT.json and OUTPUT.md"
    )
    args = parser.parse_args(argv)
    for variant in args.variants.split(","):
        if variant not in ("eager", "compile"):
            raise ValueError(f"unknown variant {variant!r}: use eager and/or compile")
    for impl in args.impls.split(","):
        if impl not in BUILDERS:
            raise ValueError(f"unknown implementation {impl!r}: choose from {sorted(BUILDERS)}")
    # Every architecture is resolved before anything is measured or written.
    args.configs = {arch: load_config(arch) for arch in args.arch.split(",")}
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    ceiling = matmul_ceiling(device, matmul_size)
    env = environment(
        device, ceiling, matmul_size, sys.argv if argv is None else ["examples/benchmarks/benchmark.py", *argv]
    )
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["platform"] = platform.platform()
    rows: list[dict] = []
    # Each row is also appended to OUTPUT.jsonl as soon as it is measured (the peers' format), so a run cut short
    # by a time limit keeps what it measured.
    progress = Path(f"{args.output}.jsonl")
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.write_text(json.dumps({"kind": "env", **env}) + "\n")

    def record(row: dict) -> None:
        rows.append(row)
        with progress.open("a") as file:
            file.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for arch in args.arch.split(","):
        config = args.configs[arch]
        name = Path(arch).stem
        batch_size = args.batch_size or DEFAULT_BATCH.get(name, 8)
        torch.manual_seed(0)
        batch = synthetic_batch(batch_size, config, device, args.longest_caption)
        for variant in args.variants.split(","):
            if "hf_clip" in args.impls.split(","):
                check = run_safely(functools.partial(exactness, config, batch, variant, args))
                record({"kind": "exactness", "impl": "hf_clip", "model": name, "variant": variant, **check})
            for impl in args.impls.split(","):
                key = {"impl": impl, "model": name, "variant": variant, "compile": variant == "compile"}
                train = run_safely(functools.partial(train_row, impl, config, batch, variant, args))
                record({"kind": "train", **key, "bs": batch_size, **train})
                if not args.no_encode:
                    encode = run_safely(
                        functools.partial(encode_row, impl, config, args.encode_batch_size, variant, args)
                    )
                    record({"kind": "encode", **key, "bs": args.encode_batch_size, **encode})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    results = {"environment": env, "rows": rows}
    table = markdown_table(results)
    print(table)
    write_results(results, table, Path(args.output))
    return results


if __name__ == "__main__":
    main()
