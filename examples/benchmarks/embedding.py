"""CPU throughput of embedding, ONNX inference and faiss search, side by side in one run (issue 14).

    python examples/benchmarks/embedding.py --output embedding_benchmark.json

Random weights of a published architecture (`--config`, default ViT-B-32), fp32, `--threads` intra-op threads for
torch, onnxruntime and faiss alike. Three sections, each timed after one warm-up, repeats interleaved, medians:

1. Embedding a folder of `--images` synthetic web-size JPEGs (375-1024 px, quality 90; `hf_clip.synthetic`),
   decoding and preprocessing included:
   - `job`: `hf_clip.embedding.job.embed_dataset` (imagefolder stream cut into parts of `--part_size` images,
     `--num_workers` DataLoader workers decoding them through the processor's fast path, batches of
     `--batch_size`, float16 parts written; model loading included);
   - `pipeline`: transformers' `pipeline("image-feature-extraction")` over the same model's image tower
     (`HfClipVisionModelWithProjection` holding the same weights), called once per image file as a
     per-image service would.
2. Embeddings per second of each tower, PyTorch eager vs onnxruntime on the file `hf_clip.onnx.export` writes,
   at batch 1 and 32, from preprocessed inputs (random pixels; random captions of 8-32 tokens, padded). The largest
   absolute difference between the two is printed beside the rates.
3. faiss over `--vectors` unit vectors of the model's embedding size, uniformly random and clustered: build time,
   queries per second for 1,000 held-out queries from the same distribution (one batched call, and one query per
   call for 200 of them), recall@10 against the exact index.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import onnxruntime
import torch
from accelerate import Accelerator
from transformers import pipeline

from hf_clip import (
    HfClipConfig,
    HfClipImageProcessor,
    HfClipModel,
    HfClipVisionConfig,
    HfClipVisionModelWithProjection,
)
from hf_clip.embedding.index import IndexSettings, build_faiss_index, recall_at_k
from hf_clip.embedding.job import EmbedConfig, embed_dataset
from hf_clip.onnx.export import (
    ImageEmbeddingGraph,
    TextEmbeddingGraph,
    export_image_tower,
    export_text_tower,
)
from hf_clip.synthetic import photo_jpegs, random_captions


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vision_config(model: HfClipModel) -> HfClipVisionConfig:
    return cast(HfClipVisionConfig, model.config.vision_config)  # a config object once the model is built


def model_folder(model: HfClipModel, folder: Path) -> Path:
    model.save_pretrained(folder)
    size = vision_config(model).image_size
    HfClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        folder
    )
    return folder


def embedding_section(model: HfClipModel, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    photos = root / "photos"
    photos.mkdir()
    files = []
    for number, data in enumerate(photo_jpegs(args.images, seed=0)["web sizes (375-1024 px)"]):
        files.append(photos / f"{number:04d}.jpg")
        files[-1].write_bytes(data)
    folder = model_folder(model, root / "model")
    accelerator = Accelerator(cpu=True)
    runs = iter(range(1_000))

    def job() -> None:
        config = EmbedConfig(
            model=str(folder),
            data_format="imagefolder",
            data_files=[str(photos)],
            output_dir=str(root / f"embeddings-{next(runs)}"),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            part_size=args.part_size,
        )
        summary = embed_dataset(config, accelerator)
        assert summary["samples"] == args.images, summary

    vision = HfClipVisionModelWithProjection(vision_config(model)).eval()
    missing, _ = vision.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    extractor = pipeline(
        "image-feature-extraction", model=vision, image_processor=HfClipImageProcessor.from_pretrained(folder)
    )

    def per_image() -> None:
        for path in files:
            extractor(str(path))

    results = {}
    for name, run in (("job", job), ("pipeline", per_image)):
        results[name] = args.images / median_seconds(run, args.repeats)
    return {"images": args.images, "images_per_second": results, "speedup": results["job"] / results["pipeline"]}


def onnx_section(model: HfClipModel, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    # onnxruntime's idle threads spin by default, taking the cores from the PyTorch runs timed in between.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    start = time.perf_counter()
    export_image_tower(model, root / "vision_model.onnx")
    export_text_tower(model, root / "text_model.onnx")
    export_seconds = time.perf_counter() - start
    sessions = {
        name: onnxruntime.InferenceSession(
            str(root / f"{name}_model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        for name in ("vision", "text")
    }
    graphs = {"vision": ImageEmbeddingGraph(model).eval(), "text": TextEmbeddingGraph(model).eval()}
    size = vision_config(model).image_size
    text_config: Any = model.config.text_config
    rows = []
    for tower in ("vision", "text"):
        for batch_size in (1, 32):
            generator = torch.Generator().manual_seed(batch_size)
            if tower == "vision":
                inputs = {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator)}
            else:
                input_ids, attention_mask = random_captions(
                    batch_size,
                    32,
                    text_config.bos_token_id,
                    text_config.eos_token_id,
                    min_length=8,
                    include_longest=True,
                    generator=generator,
                )
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            numpy_inputs = {name: value.numpy() for name, value in inputs.items()}
            with torch.no_grad():
                expected = graphs[tower](**inputs).numpy()
            difference = float(np.abs(sessions[tower].run(None, numpy_inputs)[0] - expected).max())
            repeats = args.repeats * (8 if batch_size == 1 else 1)

            def eager(tower: str = tower, inputs: dict = inputs) -> None:
                with torch.no_grad():
                    graphs[tower](**inputs)

            def ort(tower: str = tower, numpy_inputs: dict = numpy_inputs) -> None:
                sessions[tower].run(None, numpy_inputs)

            eager_rate = batch_size / median_seconds(eager, repeats)
            ort_rate = batch_size / median_seconds(ort, repeats)
            rows.append(
                {
                    "tower": tower,
                    "batch_size": batch_size,
                    "eager_per_second": eager_rate,
                    "onnxruntime_per_second": ort_rate,
                    "ratio": ort_rate / eager_rate,
                    "max_abs_difference": difference,
                }
            )
    return {"export_seconds": export_seconds, "rows": rows}


def index_section(dim: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)

    def unit(vectors: np.ndarray) -> np.ndarray:
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    # Uniformly random unit vectors have no neighbourhoods to find (every pair is nearly orthogonal); the clustered
    # set (1,000 centres, noise of the same norm as a centre) has them, as embeddings of real collections do.
    centres = unit(rng.standard_normal((1000, dim)))

    def clustered(count: int) -> np.ndarray:
        noise = unit(rng.standard_normal((count, dim)))
        return unit(centres[rng.integers(0, len(centres), count)] + noise)

    data = {
        "random": (unit(rng.standard_normal((args.vectors, dim))), unit(rng.standard_normal((1000, dim)))),
        "clustered": (clustered(args.vectors), clustered(1000)),
    }
    rows = []
    for name, (vectors, queries) in data.items():
        exact = None
        for settings in (IndexSettings(), IndexSettings(index_type="ivf"), IndexSettings(index_type="hnsw")):
            start = time.perf_counter()
            index = build_faiss_index(vectors, settings)
            build_seconds = time.perf_counter() - start
            exact = exact or index

            def batched_search(index: faiss.Index = index, queries: np.ndarray = queries) -> None:
                index.search(queries, 10)

            def one_by_one(index: faiss.Index = index, queries: np.ndarray = queries) -> None:
                for query in queries[:200]:
                    index.search(query[None], 10)

            row = {
                "data": name,
                "index": settings.index_type,
                "build_seconds": build_seconds,
                "queries_per_second_batched": len(queries) / median_seconds(batched_search, args.repeats),
                "queries_per_second_one_by_one": 200 / median_seconds(one_by_one, 1),
                "recall@10": recall_at_k(index, exact, queries),
            }
            if settings.index_type == "ivf":
                ivf = faiss.extract_index_ivf(index)
                row["parameters"] = f"nlist {ivf.nlist}, nprobe {ivf.nprobe}"
            elif settings.index_type == "hnsw":
                row["parameters"] = (
                    f"M {settings.hnsw_m}, efConstruction {settings.ef_construction}, efSearch {settings.ef_search}"
                )
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ViT-B-32", help="A published architecture name or a config JSON.")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--part_size", type=int, default=32, help="Images per part: parts are what workers share.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", nargs="+", default=["embedding", "onnx", "index"])
    parser.add_argument("--output", default=None, help="Also write the results as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.config.endswith(".json"):
        config = HfClipConfig.from_json_file(args.config)
    else:
        config = HfClipConfig.from_architecture(args.config)
    model = HfClipModel(config).eval()
    results: dict[str, Any] = {"config": args.config, "threads": args.threads, "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if "embedding" in args.sections:
            results["embedding"] = embedding_section(model, root, args)
            print(json.dumps(results["embedding"], indent=2), flush=True)
        if "onnx" in args.sections:
            results["onnx"] = onnx_section(model, root, args)
            print(json.dumps(results["onnx"], indent=2), flush=True)
        if "index" in args.sections:
            results["index"] = index_section(model.config.projection_dim, args)
            print(json.dumps(results["index"], indent=2), flush=True)
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps({key: results[key] for key in ("load_before", "load_after")}))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
