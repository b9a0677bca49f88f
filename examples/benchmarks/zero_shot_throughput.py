"""CPU throughput of zero-shot classification: cached class matrix vs transformers' stock pipeline, in one run.

    python examples/benchmarks/zero_shot_throughput.py --config ViT-B-32

Both sides get the same random weights (HfClipModel, and transformers' CLIPModel loaded with its state dict), the
same CLIP BPE tokenizer, the same `CLIPImageProcessor` and the same PIL images and labels, and start from PIL
images (preprocessing included). Measured, interleaved `--repeats` times (medians reported):

- `stock`: `pipeline("zero-shot-image-classification")` on CLIPModel at its default batch size 1; it tokenizes and
  encodes every label's text again for every image;
- `stock_batched`: the same pipeline with `batch_size=--batch_size` (texts encoded once per batch);
- `ensemble_pipeline`: hf_clip's "zero-shot-image-classification-ensemble" pipeline at batch size 1 (class matrix
  cached, image tower per image);
- `cached`: `ZeroShotClassifier` built once per run (its build time included), then batches of `--batch_size`
  images: preprocessing, one image-tower pass and one matmul each.

Predictions of `stock` and `cached` are compared to show both do the same work. The ratio printed is
stock / cached in images per second.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPModel, pipeline

from hf_clip import HfClipConfig, HfClipModel, HfClipTokenizer, ZeroShotClassifier
from hf_clip.foreign_configs import transformers_clip_config
from hf_clip.pipeline_zero_shot import ZeroShotEnsembleImageClassificationPipeline
from hf_clip.testing_utils import random_images

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEMPLATE = "a photo of a {}."
METHODS = ("stock", "stock_batched", "ensemble_pipeline", "cached")


def models_from_config(name_or_path: str, seed: int = 0) -> tuple[HfClipModel, CLIPModel]:
    """A randomly initialised HfClipModel (a published architecture name or a config JSON) and a transformers
    CLIPModel holding the same weights."""
    if name_or_path.endswith(".json"):
        config = HfClipConfig.from_json_file(name_or_path)
    else:
        config = HfClipConfig.from_architecture(name_or_path)
    torch.manual_seed(seed)
    model = HfClipModel(config).eval()
    reference = CLIPModel(transformers_clip_config(config)).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    return model, reference


def cached_predictions(
    model: HfClipModel, tokenizer: Any, processor: Any, images: list, labels: list[str], batch_size: int, template: str
) -> list[str]:
    classifier = ZeroShotClassifier.from_model(model, tokenizer, labels, [template])
    predictions = []
    for start in range(0, len(images), batch_size):
        pixel_values = processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        predictions += [row[0]["label"] for row in classifier.predict(classifier.classify(model, pixel_values), k=1)]
    return predictions


def measure_throughput(
    model: HfClipModel,
    reference: CLIPModel,
    tokenizer: Any,
    processor: Any,
    images: list,
    labels: list[str],
    batch_size: int,
    repeats: int,
    methods: Sequence[str] = METHODS,
    template: str = TEMPLATE,
) -> dict[str, Any]:
    """Images per second of each of `methods` (median over interleaved repeats) and the stock/cached ratio."""
    stock = pipeline("zero-shot-image-classification", model=reference, tokenizer=tokenizer, image_processor=processor)
    ours = ZeroShotEnsembleImageClassificationPipeline(model=model, tokenizer=tokenizer, image_processor=processor)
    runners: dict[str, Callable[[], list[str]]] = {
        "stock": lambda: [r[0]["label"] for r in stock(images, candidate_labels=labels, hypothesis_template=template)],
        "stock_batched": lambda: [
            r[0]["label"]
            for r in stock(images, candidate_labels=labels, hypothesis_template=template, batch_size=batch_size)
        ],
        "ensemble_pipeline": lambda: [
            r[0]["label"] for r in ours(images, candidate_labels=labels, templates=[template])
        ],
        "cached": lambda: cached_predictions(model, tokenizer, processor, images, labels, batch_size, template),
    }
    if "stock" not in methods or "cached" not in methods or not set(methods) <= set(runners):
        raise ValueError(f"methods must include 'stock' and 'cached', from {METHODS}; got {list(methods)}.")
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    predictions: dict[str, list[str]] = {}
    with torch.inference_mode():
        for name in methods:  # warm-up (and the class matrix of the ensemble pipeline's cache)
            predictions[name] = runners[name]()
        for _ in range(repeats):
            for name in methods:
                start = time.perf_counter()
                runners[name]()
                seconds[name].append(time.perf_counter() - start)
    throughput = {name: len(images) / statistics.median(times) for name, times in seconds.items()}
    agreement = np.mean([a == b for a, b in zip(predictions["stock"], predictions["cached"], strict=True)])
    return {
        "images_per_second": throughput,
        "seconds": seconds,
        "ratio_cached_vs_stock": throughput["cached"] / throughput["stock"],
        "prediction_agreement_stock_vs_cached": float(agreement),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ViT-B-32", help="architecture name or hf_clip config JSON")
    parser.add_argument("--num_images", type=int, default=100)
    parser.add_argument("--image_size", type=int, default=256, help="Side of the random square input images.")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--output", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model, reference = models_from_config(args.config)
    resolution = model.config.tower_configs()[1].image_size
    processor = CLIPImageProcessor(size={"shortest_edge": resolution}, crop_size=resolution)
    tokenizer = HfClipTokenizer.from_clip_bpe()
    images = random_images(args.num_images, size=(args.image_size, args.image_size))
    load_before = os.getloadavg()
    results = measure_throughput(model, reference, tokenizer, processor, images, LABELS, args.batch_size, args.repeats)
    results.update(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        config=args.config,
        num_images=args.num_images,
        num_labels=len(LABELS),
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
    )
    print(json.dumps(results, indent=2))
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"cached classifier / stock pipeline: {results['ratio_cached_vs_stock']:.1f}x")


if __name__ == "__main__":
    main()
