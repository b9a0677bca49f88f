"""CPU measurements of the speed candidates that can be shown without a GPU, on full-size towers.

- Text tower (ViT-B/32's, 12 layers × 512): training step (forward + backward of the pooled embedding) with 77
  padded tokens and the padding mask (what transformers' CLIPModel runs), the same without the mask (sdpa's
  `is_causal` path: exact because padding follows each caption's EOS), and trimmed to a batch whose longest
  caption is 32 or 16 tokens (`hf_clip.batching.trim_to_longest`).
- RN50 image tower: training step in NCHW and in channels-last memory format.
- How far inductor compilation alone moves fp32 loss and gradients (tiny ViT), the scale of the benchmark's
  exactness tolerance.
- Whole model (ViT-B/32, the anchor batch of `benchmark.py`): forward, loss and backward of each implementation of
  `implementations.py`, as a CPU cross-check of the GPU table (wall-clock rows are noise on a shared host).

fp32, one thread, per CPU-second of this process; variants interleaved round after round, median reported.

    taskset -c 1 python examples/benchmarks/cpu_candidates.py --text-batch 32 --image-batch 4 --rounds 3
    taskset -c 1 python examples/benchmarks/cpu_candidates.py --sections implementations --model-batch 4 --rounds 4
    taskset -c 0 python examples/benchmarks/cpu_candidates.py --sections compile
"""

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchmark import load_config, synthetic_batch
from implementations import BUILDERS

from hf_clip import HfClipConfig, HfClipTextModel
from hf_clip.modeling_hf_clip import build_vision_tower
from hf_clip.synthetic import random_captions


def text_batch(batch_size: int, longest: int, context: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions of 5..`longest` tokens (BOS ... EOS), one of them `longest`, zero-padded to `context`."""
    return random_captions(
        batch_size,
        context,
        config.bos_token_id,
        config.eos_token_id,
        min_length=5,
        max_length=longest,
        include_longest=True,
        generator=torch.Generator().manual_seed(0),
    )


def interleaved(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median CPU seconds per call of each step, measured round-robin."""
    for step in steps.values():
        step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.process_time()
            step()
            seconds[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def text_candidates(args: argparse.Namespace) -> dict[str, float]:
    text_config = HfClipConfig.from_architecture("ViT-B-32").tower_configs()[0]
    text_model = HfClipTextModel._from_config(text_config, attn_implementation="sdpa").train()
    input_ids, attention_mask = text_batch(args.text_batch, 77, 77, text_config)
    short = {n: text_batch(args.text_batch, n, 77, text_config) for n in (32, 16)}

    def text_step(ids: torch.Tensor, mask: torch.Tensor | None) -> Callable[[], None]:
        def step() -> None:
            text_model(input_ids=ids, attention_mask=mask).pooler_output.sum().backward()

        return step

    text_steps = {
        "77 tokens, padding mask": text_step(input_ids, attention_mask),
        "77 tokens, no mask (is_causal)": text_step(input_ids, None),
        "longest 32, untrimmed (77, mask)": text_step(*short[32]),
        "longest 32, trimmed, no mask": text_step(short[32][0][:, :32], None),
        "longest 16, untrimmed (77, mask)": text_step(*short[16]),
        "longest 16, trimmed, no mask": text_step(short[16][0][:, :16], None),
    }
    return {k: args.text_batch / v for k, v in interleaved(text_steps, args.rounds).items()}


def resnet_candidates(args: argparse.Namespace) -> dict[str, float]:
    resnet_config = HfClipConfig.from_architecture("RN50").tower_configs()[1]
    tower = build_vision_tower(resnet_config).train()
    tower_channels_last = build_vision_tower(resnet_config).train().to(memory_format=torch.channels_last)
    tower_channels_last.load_state_dict(tower.state_dict())
    pixels = torch.randn(args.image_batch, 3, 224, 224)
    pixels_channels_last = pixels.contiguous(memory_format=torch.channels_last)
    image_steps = {
        "RN50 NCHW": lambda: tower(pixel_values=pixels).pooler_output.sum().backward(),
        "RN50 channels-last": lambda: (
            tower_channels_last(pixel_values=pixels_channels_last).pooler_output.sum().backward()
        ),
    }
    return {k: args.image_batch / v for k, v in interleaved(image_steps, args.rounds).items()}


def implementations(args: argparse.Namespace) -> dict[str, float]:
    config = load_config("ViT-B-32")
    device = torch.device("cpu")
    pixel_values, input_ids, attention_mask = synthetic_batch(args.model_batch, config, device)
    steps: dict[str, Callable[[], None]] = {}
    for name in ("hf_clip", "hf_clip-plain", "transformers", "open_clip"):
        torch.manual_seed(0)
        impl = BUILDERS[name](config, device)
        text = impl.prepare_text(input_ids, attention_mask)
        pixels = impl.prepare_pixels(pixel_values)

        def step(impl=impl, pixels=pixels, text=text) -> None:
            impl.loss(pixels, *text).backward()
            impl.model.zero_grad(set_to_none=True)

        steps[name] = step
    return {k: args.model_batch / v for k, v in interleaved(steps, args.rounds).items()}


def compile_deviation(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """How far compiling moves fp32 loss and gradients, against eager `hf_clip-plain` (tiny ViT, inductor)."""
    config = load_config(str(Path(__file__).resolve().parent / "tiny-vit.json"))
    torch.manual_seed(0)
    pixel_values, input_ids, attention_mask = synthetic_batch(4, config, torch.device("cpu"))

    def loss_and_grads(name: str, compiled: bool) -> tuple[float, dict[str, torch.Tensor]]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        impl = BUILDERS[name](config, torch.device("cpu"))
        loss_fn = torch.compile(impl.loss) if compiled else impl.loss
        loss = loss_fn(impl.prepare_pixels(pixel_values), *impl.prepare_text(input_ids, attention_mask))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in impl.model.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    reference_loss, reference = loss_and_grads("hf_clip-plain", compiled=False)
    reference_flat = torch.cat([g.flatten() for g in reference.values()])
    deviations = {}
    for name, compiled in (("hf_clip", False), ("hf_clip-plain", True), ("hf_clip", True)):
        loss, grads = loss_and_grads(name, compiled)
        diff = torch.cat([(grads[k] - reference[k]).flatten() for k in reference])
        deviations[f"{name} {'compiled' if compiled else 'eager'}"] = {
            "loss_abs_diff": abs(loss - reference_loss),
            "grad_rel_l2_diff": float(diff.norm() / reference_flat.norm()),
            "grad_max_abs_diff": float(diff.abs().max()),
            "grad_max_abs": float(reference_flat.abs().max()),
        }
    return deviations


SECTIONS = {
    "text": ("text_tower_samples_per_cpu_second", text_candidates),
    "resnet": ("rn50_tower_samples_per_cpu_second", resnet_candidates),
    "implementations": ("vit_b32_training_samples_per_cpu_second", implementations),
    "compile": ("fp32_deviation_from_eager_hf_clip_plain", compile_deviation),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="text,resnet,implementations,compile")
    parser.add_argument("--text-batch", type=int, default=32)
    parser.add_argument("--image-batch", type=int, default=4)
    parser.add_argument("--model-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="cpu_candidates.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict = {"torch": torch.__version__, "load_average_before": os.getloadavg()}
    for section in args.sections.split(","):
        key, measure = SECTIONS[section]
        results[key] = measure(args)
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
