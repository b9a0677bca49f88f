"""Int8 CPU inference (issue 19): speed of each tower and quality against fp32, side by side in one run.

    python examples/benchmarks/int8.py --demo-model demo_output/run/model \\
        --icon-model finetune_study_output/pretrain/model --output int8_benchmark.json

Implementations (all fp32 inputs, `--threads` intra-op threads for torch and onnxruntime alike):

- `eager`: the PyTorch model in fp32 (what `--backend torch` runs);
- `torch-int8`: the same model after `hf_clip.onnx.quantize.quantize_torch` (dynamic int8 `nn.Linear`);
- `onnx`: the fp32 ONNX graph of `hf_clip.onnx.export`, run with onnxruntime;
- `onnx-int8`: that graph after onnxruntime's dynamic quantisation (`quantize_tower(..., "dynamic")`);
- `onnx-int8-static` (image tower only): static QDQ quantisation calibrated on `--calibration` real images
  (Fashion-MNIST training images and icons, none of them among the images scored).

Sections:

1. `speed`: full-size random-init published architectures (`--arches`, default ViT-B-32 and RN50), batch 1 and 32;
   images/s from random pixels, texts/s from random captions of 8-32 tokens padded to the longest. For every
   (arch, tower, batch) the implementations are timed in turn, repeat after repeat (interleaved: load on this
   shared machine hits them alike), after one warm-up each; medians. The RN50 text tower is the same architecture
   as ViT-B/32's (12 layers, width 512), so texts/s is measured on ViT-B/32 only.
2. `cosine`: the same full-size models, each implementation's embeddings against eager fp32 (cosine of each row):
   `--quality-images` Fashion-MNIST test images and as many icon PNGs, the icons' names as captions.
3. `trained`: models trained here, through the embedding backends (`hf_clip.embedding.backends.load_encoder`):
   the demo's Fashion-MNIST model, zero-shot top-1 on the 10,000 test images (ensemble of the demo's templates),
   and the fine-tuning study's icon-pretrained model, held-out icon retrieval R@1 (mean of image→text and
   text→image, pooled over styles, as `examples/finetune_study.py` scores it); fp32 vs every int8 variant.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import PIL.Image
import torch

from hf_clip import HfClipConfig, HfClipImageProcessor, HfClipModel, HfClipTokenizer
from hf_clip.demo import icons
from hf_clip.demo.fashion_mnist import CLASS_NAMES, FASHION_MNIST, TEMPLATES, read_idx
from hf_clip.embedding.backends import ClipEncoder, load_encoder
from hf_clip.embedding.encoders import ImagePreprocessor
from hf_clip.evaluation.metrics import retrieval_recall_at_k
from hf_clip.onnx.export import ImageEmbeddingGraph, TextEmbeddingGraph, export_image_tower, export_text_tower
from hf_clip.onnx.quantize import CALIBRATION_BATCH, PixelCalibration, quantize_onnx, quantize_torch, quantize_tower
from hf_clip.synthetic import random_captions

Run = Callable[[dict[str, Any]], np.ndarray]


def fashion_images(split: str, count: int) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(image) for image in read_idx(FASHION_MNIST / f"{split}-images-idx3-ubyte.gz")[:count]]


def icon_sample(count: int, offset: int) -> list[icons.Icon]:
    """`count` evaluation icons, every style, deterministic (the stride keeps styles and names mixed)."""
    found = icons.evaluation_icons(icons.find_icons())
    return found[offset::7][:count]


def open_icons(sample: list[icons.Icon]) -> list[PIL.Image.Image]:
    pictures = []
    for icon in sample:
        with PIL.Image.open(icon.path) as image:
            pictures.append(image.copy())
    return pictures


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # onnxruntime's idle threads spin by default, taking the cores from the PyTorch runs timed in between.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def implementations(model: HfClipModel, root: Path, calibration: list, threads: int) -> dict[str, dict[str, Run]]:
    """tower → implementation name → inputs (numpy) → embeddings (numpy), for one full-size model."""
    graphs = {"vision": ImageEmbeddingGraph(model).eval(), "text": TextEmbeddingGraph(model).eval()}
    quantized = quantize_torch(model)
    int8_graphs = {"vision": ImageEmbeddingGraph(quantized).eval(), "text": TextEmbeddingGraph(quantized).eval()}
    size = model.config.vision_config.image_size  # type: ignore[union-attr]
    processor = HfClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    export_image_tower(model, root / "vision.onnx")
    export_text_tower(model, root / "text.onnx")
    for tower in ("vision", "text"):
        quantize_tower(root / f"{tower}.onnx", root / f"{tower}-int8.onnx", "dynamic")
    reader = PixelCalibration(calibration, ImagePreprocessor(processor), CALIBRATION_BATCH)
    quantize_tower(root / "vision.onnx", root / "vision-int8-static.onnx", "static", reader)

    def torch_run(graph: torch.nn.Module) -> Run:
        def run(inputs: dict[str, Any]) -> np.ndarray:
            with torch.no_grad():
                return graph(**{name: torch.from_numpy(value) for name, value in inputs.items()}).numpy()

        return run

    def onnx_run(name: str) -> Run:
        onnx_session = session(root / f"{name}.onnx", threads)
        return lambda inputs: onnx_session.run(None, inputs)[0]

    runs: dict[str, dict[str, Run]] = {}
    for tower in ("vision", "text"):
        runs[tower] = {
            "eager": torch_run(graphs[tower]),
            "torch-int8": torch_run(int8_graphs[tower]),
            "onnx": onnx_run(tower),
            "onnx-int8": onnx_run(f"{tower}-int8"),
        }
    runs["vision"]["onnx-int8-static"] = onnx_run("vision-int8-static")
    return runs


def timed(run: Run, inputs: dict[str, Any]) -> float:
    start = time.perf_counter()
    run(inputs)
    return time.perf_counter() - start


def speed_rows(arch: str, runs: dict[str, dict[str, Run]], model: HfClipModel, args: argparse.Namespace) -> list:
    size = model.config.vision_config.image_size  # type: ignore[union-attr]
    text_config: Any = model.config.text_config
    rows = []
    towers = ("vision", "text") if arch == args.arches[0] else ("vision",)
    for tower in towers:
        for batch_size in (1, 32):
            generator = torch.Generator().manual_seed(batch_size)
            if tower == "vision":
                inputs = {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator).numpy()}
            else:
                input_ids, attention_mask = random_captions(
                    batch_size, 32, text_config.bos_token_id, text_config.eos_token_id, min_length=8,
                    include_longest=True, generator=generator,
                )  # fmt: skip
                inputs = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
            times: dict[str, list[float]] = defaultdict(list)
            for run in runs[tower].values():
                run(inputs)  # warm-up
            repeats = args.repeats * (4 if batch_size == 1 else 1)
            for _ in range(repeats):
                for name, run in runs[tower].items():  # interleaved
                    times[name].append(timed(run, inputs))
            rates = {name: batch_size / statistics.median(values) for name, values in times.items()}
            row = {"arch": arch, "tower": tower, "batch_size": batch_size, "per_second": rates}
            row["vs_eager"] = {name: rate / rates["eager"] for name, rate in rates.items()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def cosine_rows(arch: str, runs: dict[str, dict[str, Run]], model: HfClipModel, args: argparse.Namespace) -> dict:
    size = model.config.vision_config.image_size  # type: ignore[union-attr]
    processor = HfClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    sample = icon_sample(args.quality_images, offset=0)
    images = {"fashion-mnist": fashion_images("t10k", args.quality_images), "icons": open_icons(sample)}
    tokenizer = HfClipTokenizer.from_clip_bpe()
    captions = [icons.caption_text(icon.name) for icon in sample]
    tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="np")
    inputs = {
        "text": {"captions": {name: np.asarray(tokens[name], np.int64) for name in ("input_ids", "attention_mask")}}
    }
    inputs["vision"] = {
        name: {"pixel_values": processor(images=pictures, return_tensors="np")["pixel_values"].astype(np.float32)}
        for name, pictures in images.items()
    }
    result: dict[str, Any] = {}
    for tower, sets in inputs.items():
        for set_name, batch in sets.items():
            reference = np.concatenate([runs[tower]["eager"](chunk) for chunk in chunks(batch, 32)])
            for name, run in runs[tower].items():
                if name == "eager":
                    continue
                embeds = np.concatenate([run(chunk) for chunk in chunks(batch, 32)])
                cosine = (embeds * reference).sum(axis=1)
                result[f"{arch} {tower} {set_name} {name}"] = {
                    "mean": float(cosine.mean()),
                    "min": float(cosine.min()),
                }
    return result


def chunks(batch: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    count = len(next(iter(batch.values())))
    return [{name: value[start : start + size] for name, value in batch.items()} for start in range(0, count, size)]


def embed_images(encoder: ClipEncoder, images: list[PIL.Image.Image]) -> np.ndarray:
    assert encoder.preprocess is not None
    pixels = [encoder.preprocess(image) for image in images]
    return np.concatenate(
        [encoder.embed_pixel_values(torch.stack(pixels[i : i + 256])) for i in range(0, len(pixels), 256)]
    )


def class_embeddings(encoder: ClipEncoder, names: list[str], templates: list[str]) -> np.ndarray:
    """Mean of the normalised template embeddings per name, renormalised (hf_clip.zero_shot's rule)."""
    texts = [template.format(c=name) for name in names for template in templates]
    embeds = np.concatenate([encoder.embed_texts(texts[i : i + 256]) for i in range(0, len(texts), 256)])
    mean = embeds.reshape(len(names), len(templates), -1).mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def fashion_top1(encoder: ClipEncoder) -> float:
    images = fashion_images("t10k", 10_000)
    labels = read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    logits = embed_images(encoder, images) @ class_embeddings(encoder, CLASS_NAMES, TEMPLATES).T
    return float((logits.argmax(axis=1) == labels).mean())


def held_out_icons() -> list[icons.Icon]:
    """The fine-tuning study's held-out icons (its split: 20% of the names, seed 0)."""
    found = icons.find_icons()
    _, held_out_names = icons.split_names((icon.name for icon in found), 0.2, seed=0)
    held_out = set(held_out_names)
    return [icon for icon in icons.evaluation_icons(found) if icon.name in held_out]


def icon_recall_at_1(encoder: ClipEncoder, held_out: list[icons.Icon]) -> float:
    names = sorted({icon.name for icon in held_out})
    index = {name: position for position, name in enumerate(names)}
    name_embeds = class_embeddings(encoder, [icons.caption_text(name) for name in names], icons.TEMPLATES)
    hits, total = 0.0, 0
    for style in sorted({icon.style for icon in held_out}):
        members = [icon for icon in held_out if icon.style == style]
        image_embeds = torch.from_numpy(embed_images(encoder, open_icons(members)))
        text_embeds = torch.from_numpy(name_embeds[[index[icon.name] for icon in members]])
        recalls = retrieval_recall_at_k(image_embeds, text_embeds, torch.arange(len(members)), ks=(1,))
        hits += (recalls["image_to_text_recall@1"] + recalls["text_to_image_recall@1"]) / 2 * len(members)
        total += len(members)
    return hits / total


def trained_rows(args: argparse.Namespace, root: Path, calibration: list[PIL.Image.Image]) -> dict[str, Any]:
    calibration_dir = root / "calibration"
    calibration_dir.mkdir()
    for number, image in enumerate(calibration):
        image.save(calibration_dir / f"{number:04d}.png")
    held_out = held_out_icons()
    rows: dict[str, Any] = {}
    for label, folder, metric in (
        ("demo Fashion-MNIST zero-shot top-1", args.demo_model, fashion_top1),
        ("icon model held-out icon R@1", args.icon_model, lambda encoder: icon_recall_at_1(encoder, held_out)),
    ):
        if folder is None:
            continue
        name = Path(folder).parent.name
        quantize_onnx(folder, root / f"{name}-int8", "dynamic")
        quantize_onnx(folder, root / f"{name}-int8-static", "static", str(calibration_dir), len(calibration))
        encoders = {
            "eager": (folder, "torch"),
            "torch-int8": (folder, "torch-int8"),
            "onnx-int8": (str(root / f"{name}-int8"), "onnx-int8"),
            "onnx-int8-static": (str(root / f"{name}-int8-static"), "onnx-int8"),
        }
        rows[label] = {impl: metric(load_encoder(path, backend)) for impl, (path, backend) in encoders.items()}
        print(json.dumps({label: rows[label]}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arches", default="ViT-B-32,RN50", type=lambda value: [a for a in value.split(",") if a])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quality-images", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=64, help="real images that calibrate static int8")
    parser.add_argument("--demo-model", default=None)
    parser.add_argument("--icon-model", default=None)
    parser.add_argument("--output", type=Path, default=Path("int8_benchmark.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    # Calibration: Fashion-MNIST training images and icons other than the scored ones (offset 3 of the stride).
    half = args.calibration // 2
    calibration = fashion_images("train", half) + open_icons(icon_sample(args.calibration - half, offset=3))
    results: dict[str, Any] = {"threads": args.threads, "speed": [], "cosine": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        results["trained"] = trained_rows(args, root, calibration)
        for arch in args.arches:
            torch.manual_seed(0)
            model = HfClipModel(HfClipConfig.from_architecture(arch)).eval()
            (root / arch).mkdir()
            runs = implementations(model, root / arch, calibration, args.threads)
            results["speed"] += speed_rows(arch, runs, model, args)
            results["cosine"].update(cosine_rows(arch, runs, model, args))
            print(json.dumps(results["cosine"]), flush=True)
            args.output.write_text(json.dumps(results, indent=2) + "\n")  # what is measured so far
            del runs, model
    results["seconds"] = time.perf_counter() - started
    results["load_average_before_after"] = [load_before, os.getloadavg()]
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
