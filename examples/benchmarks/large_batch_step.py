"""One training step of a tiny CLIP at the paper's accumulated batch (32,768) on CPU, with the tiled or dense loss
(issue 20): cached accumulation over `--micro_batch` micro-batches, peak RSS and time.

    python examples/benchmarks/large_batch_step.py --batch 32768 --micro_batch 1024 --tile_size 1024

The model is `hf_clip.testing_utils.tiny_config()` (random weights), the inputs random pixels and 16-token random
captions. The step is `hf_clip.training.steps.cached_accumulation_backward`, the one the training loop runs.
"""

import argparse
import json
import resource
import time

import torch

from hf_clip import ClipLoss, HfClipModel
from hf_clip.testing_utils import TINY_IMAGE_SIZE, random_text, tiny_config
from hf_clip.training.objective import ClipObjective
from hf_clip.training.steps import ClipEmbedder, cached_accumulation_backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--micro_batch", type=int, default=1024)
    parser.add_argument("--tile_size", type=int, default=1024, help="0: the dense loss")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the same weights for the tiled and the dense run
    config = tiny_config()
    model = HfClipModel._from_config(config, attn_implementation="sdpa").train()
    objective = ClipObjective(ClipEmbedder(model), ClipLoss(tile_size=args.tile_size or None))
    size = TINY_IMAGE_SIZE
    generator = torch.Generator().manual_seed(0)
    micro_batches = [
        {
            "pixel_values": torch.randn(args.micro_batch, 3, size, size, generator=generator),
            "input_ids": random_text(args.micro_batch, 16, seed=index)["input_ids"],
        }
        for index in range(args.batch // args.micro_batch)
    ]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    loss = cached_accumulation_backward(objective, micro_batches)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "batch": args.batch,
        "micro_batch": args.micro_batch,
        "tile_size": args.tile_size or None,
        "loss": loss.item(),
        "seconds": seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "step_memory_mb": peak - baseline,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
