"""Fine-tuning study: a small CLIP pretrained on icon captions, fine-tuned on Fashion-MNIST captions, three ways.

`python examples/finetune_study.py --output-dir finetune_study_output` (what `make finetune-study` runs):

1. icons of the Adwaita, Tango and Oxygen themes (`hf_clip.demo.icons`), split by concept: 20% of the icon names
   are held out; the training names' icons at every size become image–caption shards;
2. Fashion-MNIST's 60,000 training images become caption shards (`hf_clip.demo.fashion_mnist`);
3. one BPE vocabulary (`train_clip_bpe`) is trained on the training captions of both sources before anything else,
   so the fine-tuning words exist at pretraining time (held-out icon names are not in its corpus);
4. a small ViT CLIP is pretrained from scratch on the icon captions (`finetune_study/pretrain.json`);
5. the pretrained model is fine-tuned on Fashion-MNIST captions (`finetune_study/finetune.json`): all weights
   ("full"), and with the image tower locked ("locked image", LiT);
6. WiSE-FT (`hf_clip.wise_ft`) interpolates the weights of the pretrained and each fine-tuned model, α = 0 … 1;
7. every model is scored on the new task, Fashion-MNIST zero-shot top-1 on the first 5,000 test images
   (`--test-images`; class embeddings from the ensemble of the demo's templates), and on the retained ability,
   retrieval among the held-out icon names: per style, each held-out name's icon against its caption embedding
   (ensemble of the icon templates), image→text and text→image Recall@1/@5, pooled over styles; "icon R@1" is the
   mean of the two directions' Recall@1;
8. `finetune_study.png` (the trade-off and both metrics against α) and `results.json` (every score, the
   observations in words, timings) go to the output folder; `finetune_study/results/` holds a committed run's.

Training runs as the demo's does: `python -m hf_clip.training <run config> --field value` in a subprocess with one
compute thread and one data-loading worker.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import AutoModel, AutoProcessor

from hf_clip.demo import icons
from hf_clip.demo.fashion_mnist import CLASS_NAMES, FASHION_MNIST, read_idx, write_shards
from hf_clip.demo.fashion_mnist import TEMPLATES as FASHION_TEMPLATES
from hf_clip.evaluation.metrics import retrieval_recall_at_k, top_k_accuracy
from hf_clip.processing_hf_clip import HfClipProcessor
from hf_clip.tokenization_hf_clip import train_clip_bpe
from hf_clip.wise_ft import wise_ft
from hf_clip.zero_shot import ZeroShotClassifier, build_class_embeddings, encode_images

STUDY = Path(__file__).with_name("finetune_study")  # run configs and the committed results
ALPHAS = [index / 10 for index in range(11)]
# Fine-tuning variant → the run-config fields it sets on top of finetune.json.
VARIANTS = {"full": [], "locked_image": ["--lock_image", "true"]}
VARIANT_LABELS = {"full": "full fine-tuning", "locked_image": "locked image tower"}
CLAIM = (
    "WiSE-FT (Wortsman et al., 2022): interpolating the weights of the pretrained and the fine-tuned model keeps more "
    "of the pretrained ability at a small cost on the fine-tuning task; the observations say how far that holds here."
)
HELD_OUT_FRACTION = 0.2
VOCAB_SIZE = 4096
BATCH = 1000  # images per evaluation forward


@dataclass
class EvaluationData:
    """Preprocessed once, scored for every model."""

    fashion_pixels: torch.Tensor
    fashion_labels: torch.Tensor
    held_out_names: list[str]
    icon_pixels: dict[str, torch.Tensor]  # style → its held-out icons
    icon_names: dict[str, list[int]]  # style → index into held_out_names of each of its icons


def preprocess(processor: HfClipProcessor, images: list[PIL.Image.Image]) -> torch.Tensor:
    chunks = [
        processor(images=images[start : start + BATCH], return_tensors="pt")["pixel_values"]
        for start in range(0, len(images), BATCH)
    ]
    return torch.cat(chunks)


def evaluation_data(
    processor: HfClipProcessor, held_out: list[icons.Icon], data_dir: Path, test_images: int
) -> EvaluationData:
    images = read_idx(data_dir / "t10k-images-idx3-ubyte.gz")[:test_images]
    labels = read_idx(data_dir / "t10k-labels-idx1-ubyte.gz")[:test_images]
    names = sorted({icon.name for icon in held_out})
    index = {name: position for position, name in enumerate(names)}
    by_style: dict[str, list[icons.Icon]] = defaultdict(list)
    for icon in held_out:
        by_style[icon.style].append(icon)
    icon_pixels, icon_names = {}, {}
    for style, members in sorted(by_style.items()):
        pictures = []
        for icon in members:
            with PIL.Image.open(icon.path) as image:
                pictures.append(image.copy())
        icon_pixels[style] = preprocess(processor, pictures)
        icon_names[style] = [index[icon.name] for icon in members]
    return EvaluationData(
        fashion_pixels=preprocess(processor, [PIL.Image.fromarray(image) for image in images]),
        fashion_labels=torch.from_numpy(labels.astype(np.int64)),
        held_out_names=names,
        icon_pixels=icon_pixels,
        icon_names=icon_names,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, processor: HfClipProcessor, data: EvaluationData) -> dict[str, float]:
    """Fashion-MNIST zero-shot top-1 (template ensemble) and held-out icon retrieval pooled over styles."""
    classifier = ZeroShotClassifier.from_model(model, processor.tokenizer, CLASS_NAMES, FASHION_TEMPLATES)
    logits = torch.cat(
        [
            classifier.classify(model, data.fashion_pixels[start : start + BATCH])
            for start in range(0, len(data.fashion_pixels), BATCH)
        ]
    )
    results = {"fashion_mnist_top1": top_k_accuracy(logits, data.fashion_labels, 1)}
    captions = [icons.caption_text(name) for name in data.held_out_names]
    name_embeddings = build_class_embeddings(model, processor.tokenizer, captions, icons.TEMPLATES)
    pooled: dict[str, float] = defaultdict(float)
    total = 0
    for style, pixels in data.icon_pixels.items():
        image_embeds = encode_images(model, pixels)
        text_embeds = name_embeddings[data.icon_names[style]]
        recalls = retrieval_recall_at_k(image_embeds, text_embeds, torch.arange(len(pixels)), ks=(1, 5))
        for key, value in recalls.items():
            pooled[key] += value * len(pixels)  # pooled over styles: hits over all queries
        total += len(pixels)
    results.update({f"icon_{key}": value / total for key, value in pooled.items()})
    results["icon_recall@1"] = (results["icon_image_to_text_recall@1"] + results["icon_text_to_image_recall@1"]) / 2
    return results


def train(run_config: Path, output_dir: Path, arguments: list[str]) -> float:
    """One training run in a subprocess, as the demo runs it; returns its wall time."""
    command = [sys.executable, "-m", "hf_clip.training", str(run_config), "--output_dir", str(output_dir), *arguments]
    print("training:", " ".join(command[3:6]), *arguments[-2:], flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    return time.perf_counter() - started


METRIC_LABELS = {"fashion_mnist_top1": "Fashion-MNIST zero-shot top-1", "icon_recall@1": "held-out icon R@1"}


def above_chord(curve: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per α, how far each metric of the WiSE-FT model lies above the straight line between the two endpoints'
    values (what picking the pretrained model with probability 1 - α and the fine-tuned one otherwise would
    score): positive on both metrics means mixing weights beats trading one ability for the other linearly."""
    first, last = curve[0], curve[-1]
    return [
        {
            "alpha": point["alpha"],
            **{
                metric: point[metric] - ((1 - point["alpha"]) * first[metric] + point["alpha"] * last[metric])
                for metric in METRIC_LABELS
            },
        }
        for point in curve
    ]


def kept(point: dict[str, float], pretrained: dict[str, float]) -> str:
    """The share of the pretrained model's held-out icon R@1 a model keeps, as a percentage."""
    return f"{point['icon_recall@1'] / pretrained['icon_recall@1']:.0%}"


def observations(models: dict[str, dict[str, float]], curves: dict[str, list[dict[str, float]]]) -> list[str]:
    """The study's findings in words, from the numbers: each fine-tuning's gain and loss, the middle of its WiSE-FT
    path, where the path lies above the line between its endpoints, and what the path keeps of the old ability at a
    small cost on the new task (the paper-level claim)."""
    pretrained = models["pretrained"]
    lines = []
    for variant, curve in curves.items():
        label, tuned = VARIANT_LABELS[variant], models[variant]
        lines.append(
            f"{label}: Fashion-MNIST zero-shot {100 * pretrained['fashion_mnist_top1']:.1f}% → "
            f"{100 * tuned['fashion_mnist_top1']:.1f}%; held-out icon R@1 {100 * pretrained['icon_recall@1']:.1f}% → "
            f"{100 * tuned['icon_recall@1']:.1f}% ({kept(tuned, pretrained)} kept)."
        )
        middle = next(point for point in curve if point["alpha"] == 0.5)
        lines.append(
            f"WiSE-FT α = 0.5 with {label}: Fashion-MNIST {100 * middle['fashion_mnist_top1']:.1f}% "
            f"({100 * (middle['fashion_mnist_top1'] - tuned['fashion_mnist_top1']):+.1f} points vs α = 1), icon R@1 "
            f"{100 * middle['icon_recall@1']:.1f}% ({kept(middle, pretrained)} kept)."
        )
        interior = [point for point in above_chord(curve) if 0 < point["alpha"] < 1]
        above = {
            metric: ", ".join(f"{point['alpha']:.1f}" for point in interior if point[metric] > 0) or "none"
            for metric in METRIC_LABELS
        }
        lines.append(
            f"WiSE-FT with {label} lies above the line between its endpoints in {METRIC_LABELS['fashion_mnist_top1']} "
            f"at α = {above['fashion_mnist_top1']} and in {METRIC_LABELS['icon_recall@1']} at α = "
            f"{above['icon_recall@1']}."
        )
        for cost in (0.02, 0.05):
            affordable = [
                point for point in curve if point["fashion_mnist_top1"] >= tuned["fashion_mnist_top1"] - cost
            ]
            best = max(affordable, key=lambda point: point["icon_recall@1"])
            lines.append(
                f"Within {100 * cost:.0f} points of {label}'s Fashion-MNIST accuracy, WiSE-FT keeps at most "
                f"{kept(best, pretrained)} of the pretrained icon R@1 (α = {best['alpha']:.1f}: Fashion-MNIST "
                f"{100 * best['fashion_mnist_top1']:.1f}%, icon R@1 {100 * best['icon_recall@1']:.1f}%); α = 1 keeps "
                f"{kept(tuned, pretrained)}."
            )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(16, 7.5))
    grid = figure.add_gridspec(2, 2, width_ratios=[1.5, 1])
    trade_off = figure.add_subplot(grid[:, 0])
    against_alpha = {"fashion_mnist_top1": figure.add_subplot(grid[0, 1])}
    against_alpha["icon_recall@1"] = figure.add_subplot(grid[1, 1], sharex=against_alpha["fashion_mnist_top1"])
    colors = {"full": "tab:blue", "locked_image": "tab:orange"}
    markers = {"full": "s", "locked_image": "^"}
    for variant, curve in results["wise_ft"].items():
        x = [100 * point["icon_recall@1"] for point in curve]
        y = [100 * point["fashion_mnist_top1"] for point in curve]
        line = "-" if variant == "full" else "--"
        label = f"WiSE-FT: pretrained ↔ {VARIANT_LABELS[variant]}"
        trade_off.plot(x, y, line, color=colors[variant], marker="o", markersize=4, label=label)
        trade_off.plot([x[0], x[-1]], [y[0], y[-1]], ":", color=colors[variant], linewidth=1)
        for point, xi, yi in zip(curve, x, y, strict=True):
            if 0 < point["alpha"] < 1:
                offset = (6, -10) if variant == "full" else (-24, 5)
                text = f"{point['alpha']:.1f}"
                trade_off.annotate(
                    text, (xi, yi), textcoords="offset points", xytext=offset, fontsize=7, color=colors[variant]
                )
        for metric, axis in against_alpha.items():
            values = [100 * point[metric] for point in curve]
            label = f"WiSE-FT with {VARIANT_LABELS[variant]}"
            axis.plot(
                [point["alpha"] for point in curve],
                values,
                line,
                color=colors[variant],
                marker=markers[variant],
                label=label,
            )
    pretrained = results["models"]["pretrained"]
    trade_off.plot(
        100 * pretrained["icon_recall@1"],
        100 * pretrained["fashion_mnist_top1"],
        "k*",
        markersize=16,
        label="pretrained on icons (α = 0)",
    )
    for variant in results["wise_ft"]:
        point = results["models"][variant]
        trade_off.plot(
            100 * point["icon_recall@1"],
            100 * point["fashion_mnist_top1"],
            markers[variant],
            color=colors[variant],
            markersize=12,
            markeredgecolor="k",
            label=f"{VARIANT_LABELS[variant]} (α = 1)",
        )
    chance = 100 * results["data"]["icon_recall@1_chance"]
    trade_off.axvline(
        chance, color="grey", linestyle="-.", linewidth=1, label=f"icon retrieval chance ({chance:.1f}%)"
    )
    trade_off.axhline(10, color="grey", linestyle="-.", linewidth=1, label="Fashion-MNIST chance (10%)")
    trade_off.plot([], [], "k:", linewidth=1, label="straight line between the endpoints")
    trade_off.set(
        xlabel="retained: held-out icon retrieval R@1, mean of image→text and text→image (%)",
        ylabel="new task: Fashion-MNIST zero-shot top-1 (%)",
        title="retained ability vs new task (WiSE-FT points labelled with α)",
    )
    trade_off.legend(fontsize=8, loc="upper right")
    against_alpha["icon_recall@1"].axhline(chance, color="grey", linestyle="-.", linewidth=1)
    for metric, axis in against_alpha.items():
        axis.set(ylabel=f"{METRIC_LABELS[metric]} (%)")
        axis.grid(alpha=0.3)
    against_alpha["fashion_mnist_top1"].set_title("each metric against α")
    against_alpha["fashion_mnist_top1"].legend(fontsize=8)
    against_alpha["icon_recall@1"].set(xlabel="α (weight of the fine-tuned model; 0 = pretrained)")
    data, config = results["data"], results["config"]
    figure.suptitle(
        f"A {config['parameters'] / 1e6:.2f}M-parameter CLIP pretrained on {data['icon_train_images']:,} icons "
        f"({config['pretrain']['max_steps']} steps), fine-tuned on Fashion-MNIST captions "
        f"({config['finetune']['max_steps']} steps); icon retrieval over {data['icon_held_out_names']} held-out names"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


@dataclass
class Prepared:
    icon_shards: list[str]
    fashion_shards: list[str]
    held_out: list[icons.Icon]
    data: dict[str, Any]  # counts for results.json


def prepare(output_dir: Path, icons_dir: Path, fashion_mnist_dir: Path) -> Prepared:
    """Training shards of both sources and the BPE vocabulary trained on their captions."""
    rng = np.random.default_rng(0)
    found = icons.find_icons(icons_dir)
    train_names, held_out_names = icons.split_names((icon.name for icon in found), HELD_OUT_FRACTION, seed=0)
    held_out_set = set(held_out_names)
    train_icons = [icon for icon in found if icon.name not in held_out_set]
    held_out = [icon for icon in icons.evaluation_icons(found) if icon.name in held_out_set]
    icon_shards, icon_captions = icons.write_icon_shards(train_icons, output_dir / "shards", "icons", 4, rng)
    images = read_idx(fashion_mnist_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx(fashion_mnist_dir / "train-labels-idx1-ubyte.gz")
    fashion_shards, fashion_captions = write_shards(images, labels, output_dir / "shards", "fashion", 4, rng)
    tokenizer = train_clip_bpe(icon_captions + fashion_captions, vocab_size=VOCAB_SIZE)
    tokenizer.save_pretrained(output_dir / "tokenizer")
    styles = sorted({icon.style for icon in held_out})
    data = {
        "icon_styles": styles,
        "icon_train_images": len(train_icons),
        "icon_train_names": len(train_names),
        "icon_held_out_names": len(held_out_names),
        "icon_held_out_images": len(held_out),
        "icon_held_out_images_per_style": {style: sum(icon.style == style for icon in held_out) for style in styles},
        # A random ranking puts the one right candidate among a style's n first with probability 1/n.
        "icon_recall@1_chance": len(styles) / len(held_out),
        "fashion_mnist_train_images": len(images),
        "vocabulary": len(tokenizer),
        "vocabulary_corpus": "the training captions of both sources (icons of the training names, Fashion-MNIST's "
        "training split), trained before pretraining: the fine-tuning words exist at pretraining time",
    }
    return Prepared(icon_shards, fashion_shards, held_out, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("finetune_study_output"))
    parser.add_argument("--icons-dir", type=Path, default=icons.ICONS)
    parser.add_argument("--fashion-mnist-dir", type=Path, default=FASHION_MNIST)
    parser.add_argument("--test-images", type=int, default=5000, help="Fashion-MNIST test images to score.")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Training seed of every run (initialisation, data order); default: "
        "the run configs'. The icon split stays the same, so runs with other seeds measure the training's spread.",
    )
    args = parser.parse_args()
    output_dir = args.output_dir.resolve()
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} exists: remove it or pick another --output-dir.")
    started = time.perf_counter()
    prepared = prepare(output_dir, args.icons_dir, args.fashion_mnist_dir)
    seconds = {"data": time.perf_counter() - started}
    print(json.dumps(prepared.data, indent=2), flush=True)

    seed = [] if args.seed is None else ["--seed", str(args.seed)]
    tokenizer = ["--tokenizer_name_or_path", str(output_dir / "tokenizer"), *seed]
    seconds["pretrain"] = train(
        STUDY / "pretrain.json", output_dir / "pretrain", [*tokenizer, "--train_data_files", *prepared.icon_shards]
    )
    pretrained_dir = output_dir / "pretrain" / "model"
    for variant, fields in VARIANTS.items():
        seconds[variant] = train(
            STUDY / "finetune.json",
            output_dir / variant,
            [
                "--model_name_or_path",
                str(pretrained_dir),
                "--train_data_files",
                *prepared.fashion_shards,
                *fields,
                *seed,
            ],
        )

    evaluation_started = time.perf_counter()
    processor = AutoProcessor.from_pretrained(pretrained_dir)
    data = evaluation_data(processor, prepared.held_out, args.fashion_mnist_dir, args.test_images)
    pretrained = AutoModel.from_pretrained(pretrained_dir).eval()
    models = {"pretrained": evaluate(pretrained, processor, data)}
    curves: dict[str, list[dict[str, float]]] = {}
    for variant in VARIANTS:
        fine_tuned = AutoModel.from_pretrained(output_dir / variant / "model").eval()
        models[variant] = evaluate(fine_tuned, processor, data)
        curves[variant] = []
        for alpha in ALPHAS:
            curves[variant].append(
                {"alpha": alpha, **evaluate(wise_ft(pretrained, fine_tuned, alpha), processor, data)}
            )
            point = curves[variant][-1]
            print(
                f"{variant} α={alpha:.1f}: Fashion-MNIST {100 * point['fashion_mnist_top1']:.1f}%, "
                f"icon R@1 {100 * point['icon_recall@1']:.1f}%",
                flush=True,
            )
    seconds["evaluation"] = time.perf_counter() - evaluation_started
    seconds["total"] = time.perf_counter() - started

    findings = observations(models, curves)
    results = {
        "command": " ".join(sys.argv),
        "claim_tested": CLAIM,
        "observations": findings,
        "models": models,
        "wise_ft": curves,
        "wise_ft_above_line_between_endpoints": {variant: above_chord(curve) for variant, curve in curves.items()},
        "metrics": {
            "fashion_mnist_top1": f"zero-shot top-1 on the first {len(data.fashion_labels)} Fashion-MNIST test "
            f"images, class embeddings from the demo's {len(FASHION_TEMPLATES)} templates (ensemble)",
            "icon_recall@1": "mean of image→text and text→image Recall@1 among the held-out names, per style "
            f"(caption embedding: ensemble of {len(icons.TEMPLATES)} icon templates), pooled over styles",
        },
        "data": {**prepared.data, "fashion_mnist_test_images": len(data.fashion_labels)},
        "config": {
            "pretrain": json.loads((STUDY / "pretrain.json").read_text()),
            "finetune": json.loads((STUDY / "finetune.json").read_text()),
            "variants": VARIANTS,
            "model": json.loads((STUDY / "model.json").read_text()),
            "parameters": sum(p.numel() for p in pretrained.parameters()),
        },
        "seconds": seconds,
        "load_average": os.getloadavg(),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    plot(results, output_dir / "finetune_study.png")
    print("\n".join(findings))
    print(f"wrote {output_dir / 'results.json'} and {output_dir / 'finetune_study.png'} ({seconds['total']:.0f} s)")


if __name__ == "__main__":
    main()
