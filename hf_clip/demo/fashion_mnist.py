"""End-to-end demo on real data: a small CLIP trained from scratch on Fashion-MNIST, evaluated zero-shot.

`python examples/demo.py --output-dir demo_output` (what `make demo` runs; also the `hf-clip-demo` console script):

1. reads Fashion-MNIST's IDX files (Debian package `dataset-fashion-mnist`);
2. writes the 60,000 training images as image–caption webdataset shards, each caption a class name in a randomly
   chosen template, and the 10,000 test images as labelled shards;
3. trains a new CLIP BPE tokenizer on those captions (`train_clip_bpe`);
4. trains a small CLIP with the training loop (`python -m hf_clip.training`, run config `fashion_mnist.json` and
   architecture `fashion_mnist_model.json` beside this file) on the CPU;
5. evaluates zero-shot on the whole official test split with one template and with the ensemble of all templates,
   runs `pipeline("zero-shot-image-classification")` on a few test images, and writes `demo.png` (loss and
   accuracy curves, test images with their predicted labels) and `summary.json`.

Training runs with one compute thread and one data-loading worker: on a 2-core machine that keeps both cores
busy (decoding and augmenting the next batch while the model trains on the current one) without oversubscribing.

Arguments after `--` are appended to the training command, after the demo's own, so they override the run config:
`python examples/demo.py --output-dir demo_output -- --max_steps 100 --warmup_steps 10`.
"""

import argparse
import gzip
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import AutoModel, AutoProcessor, pipeline

from ..synthetic import write_webdataset_shard
from ..tokenization_hf_clip import train_clip_bpe
from ..training.run_folder import read_metrics
from ..zero_shot import ZeroShotClassifier

# The run config and the architecture it names sit beside this module (package data).
DEFAULT_TRAIN_CONFIG = Path(__file__).with_name("fashion_mnist.json")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
# Captions are written from these; zero-shot evaluation uses the first alone and all of them as an ensemble.
TEMPLATES = [
    "a photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a {c}.",
    "a black and white photo of a {c}.",
    "a low resolution photo of the {c}.",
    "a grayscale image of a {c}.",
    "{c}",
    "a product photo of a {c}.",
    "a photo of the {c}.",
]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): magic (2 zero bytes, type 0x08 = uint8, number of dimensions), sizes, then the data."""
    with gzip.open(path) as file:
        data = file.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def write_shards(
    images: np.ndarray, labels: np.ndarray, folder: Path, prefix: str, num_shards: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """Shuffled webdataset shards of `<key>.png`, `<key>.txt` (caption) and `<key>.cls` (label); returns the
    shard paths and the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(images))
    captions = [TEMPLATES[rng.integers(len(TEMPLATES))].replace("{c}", CLASS_NAMES[labels[i]]) for i in order]
    paths = []
    for shard, positions in enumerate(np.array_split(np.arange(len(order)), num_shards)):
        path = folder / f"{prefix}-{shard:03d}.tar"
        samples = (
            (
                f"{prefix}{order[position]:05d}",
                {
                    "png": png_bytes(images[order[position]]),
                    "txt": captions[position].encode(),
                    "cls": b"%d" % labels[order[position]],
                },
            )
            for position in positions
        )
        write_webdataset_shard(path, samples)
        paths.append(str(path))
    return paths, captions


@torch.no_grad()
def zero_shot_predictions(model, processor, images: np.ndarray, templates: list[str]) -> torch.Tensor:
    classifier = ZeroShotClassifier.from_model(model, processor.tokenizer, CLASS_NAMES, templates)
    predictions = []
    for start in range(0, len(images), 1000):
        batch = [PIL.Image.fromarray(image) for image in images[start : start + 1000]]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
        predictions.append(classifier.classify(model, pixel_values).argmax(dim=-1))
    return torch.cat(predictions)


def plot(metrics: list[dict], images: np.ndarray, labels: np.ndarray, predictions: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(15, 10))
    grid = figure.add_gridspec(4, 10, height_ratios=[1.6, 1.6, 1, 1])
    loss_axis = figure.add_subplot(grid[:2, :5])
    steps = [m["step"] for m in metrics]
    loss_axis.plot(steps, [m["loss"] for m in metrics])
    loss_axis.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    accuracy_axis = figure.add_subplot(grid[:2, 5:])
    evaluated = [m for m in metrics if "zero_shot_top1" in m]
    for key, name in (("zero_shot_top1", "one template"), ("zero_shot_top1_ensemble", "template ensemble")):
        accuracy_axis.plot([m["step"] for m in evaluated], [100 * m[key] for m in evaluated], marker="o", label=name)
    accuracy_axis.set(xlabel="step", ylabel="zero-shot top-1 (%)", title="zero-shot accuracy during training")
    accuracy_axis.legend()
    for cell in range(20):
        axis = figure.add_subplot(grid[2 + cell // 10, cell % 10])
        axis.imshow(images[cell], cmap="gray")
        predicted, true = CLASS_NAMES[int(predictions[cell])], CLASS_NAMES[int(labels[cell])]
        title = predicted if predicted == true else f"{predicted}\n(is {true})"
        axis.set_title(title, fontsize=9, color="green" if predicted == true else "red")
        axis.axis("off")
    figure.suptitle(
        "hf_clip trained from scratch on Fashion-MNIST captions; test images with zero-shot predictions (ensemble)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def split_training_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """`(demo arguments, training arguments)`: the training command gets everything after the first `--`."""
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1 :]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        usage="%(prog)s [options] [-- training arguments]",
        epilog="Arguments after `--` are appended to the training command (`python -m hf_clip.training`).",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    parser.add_argument("--data-dir", type=Path, default=FASHION_MNIST)
    parser.add_argument("--train-config", type=Path, default=DEFAULT_TRAIN_CONFIG)
    parser.add_argument("--max-steps", type=int, default=None, help="Override the config's max_steps.")
    demo_argv, training_argv = split_training_arguments(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(demo_argv)
    output_dir = args.output_dir.resolve()
    if (output_dir / "run").exists():
        raise FileExistsError(f"{output_dir / 'run'} exists: remove it or pick another --output-dir.")
    started = time.perf_counter()

    train_images = read_idx(args.data_dir / "train-images-idx3-ubyte.gz")
    train_labels = read_idx(args.data_dir / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(args.data_dir / "t10k-images-idx3-ubyte.gz")
    test_labels = read_idx(args.data_dir / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    train_shards, captions = write_shards(train_images, train_labels, output_dir / "shards", "train", 8, rng)
    test_shards, _ = write_shards(test_images, test_labels, output_dir / "shards", "test", 2, rng)
    elapsed = time.perf_counter() - started
    print(f"wrote {len(train_shards)} training and {len(test_shards)} test shards ({elapsed:.0f} s)")

    tokenizer = train_clip_bpe(captions, vocab_size=1024)
    tokenizer.save_pretrained(output_dir / "tokenizer")
    print(f"trained a {len(tokenizer)}-token BPE vocabulary on {len(captions)} captions")

    command = [sys.executable, "-m", "hf_clip.training", str(args.train_config)]
    command += ["--output_dir", str(output_dir / "run"), "--tokenizer_name_or_path", str(output_dir / "tokenizer")]
    command += ["--train_data_files", *train_shards, "--eval_data_files", *test_shards]
    command += ["--class_names", *CLASS_NAMES, "--templates", *TEMPLATES]
    if args.max_steps is not None:
        command += ["--max_steps", str(args.max_steps)]
    command += training_argv
    print("training:", " ".join(command[:4]), "...", " ".join(training_argv))
    train_started, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    train_wall = time.perf_counter() - train_started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # train.py and its data worker
    train_cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    metrics = read_metrics(output_dir / "run")

    model_dir = output_dir / "run" / "model"
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    labels = torch.from_numpy(test_labels.astype(np.int64))
    single = zero_shot_predictions(model, processor, test_images, TEMPLATES[:1])
    ensemble = zero_shot_predictions(model, processor, test_images, TEMPLATES)
    summary = {
        "zero_shot_top1_single_template": float((single == labels).float().mean()),
        "zero_shot_top1_ensemble": float((ensemble == labels).float().mean()),
        "test_images": len(labels),
        "train_steps": metrics[-1]["step"],
        "train_seconds_in_steps": metrics[-1]["train_seconds"],
        "train_wall_seconds_with_startup_and_eval": train_wall,
        # CPU time of train.py and its data worker: what the run costs on otherwise idle cores.
        "train_cpu_seconds_with_startup_and_eval": train_cpu,
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_average": os.getloadavg(),
    }

    classifier = pipeline("zero-shot-image-classification", model=str(model_dir))
    for index in range(4):
        scores = classifier(PIL.Image.fromarray(test_images[index]), candidate_labels=CLASS_NAMES)
        top = ", ".join(f"{s['label']} {s['score']:.2f}" for s in scores[:3])
        print(f"pipeline on test image {index} (true: {CLASS_NAMES[test_labels[index]]}): {top}")

    plot(metrics, test_images, test_labels, ensemble, output_dir / "demo.png")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(
        f"zero-shot top-1 on the 10,000 test images: {100 * summary['zero_shot_top1_single_template']:.2f}% "
        f"(one template), {100 * summary['zero_shot_top1_ensemble']:.2f}% (ensemble of {len(TEMPLATES)}); "
        f"training {summary['train_seconds_in_steps']:.0f} s in steps, {train_wall:.0f} s wall, "
        f"{train_cpu:.0f} s CPU; figure: {output_dir / 'demo.png'}"
    )


if __name__ == "__main__":
    main()
