"""Build the `HfClipProcessor` of a converted checkpoint from what the source ships.

The tokenizer comes from the source's vocabulary: OpenAI's `bpe_simple_vocab_16e6.txt.gz` (the copy in open_clip's
or clip's package by default), or a folder's `vocab.json` + `merges.txt` or `tokenizer.json` (transformers and
open_clip Hub folders).
The image processor comes from the source's preprocessing: resolution from the model, mean/std/interpolation from
the source's config. Every tokenizer is checked against the model config: same vocabulary size and BOS/EOS ids.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from hf_clip import HfClipConfig, HfClipImageProcessor, HfClipProcessor, HfClipTokenizer
from hf_clip.tokenization_hf_clip import check_tokenizer

INTERPOLATIONS = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}


def clip_image_processor(
    image_size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    resample: PILImageResampling = PILImageResampling.BICUBIC,
) -> HfClipImageProcessor:
    """Resize the shortest side to `image_size`, centre-crop a square of it, normalise with `mean`/`std`."""
    return HfClipImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
        resample=resample,
    )


def has_vocabulary(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


def tokenizer_from_folder(folder: str | Path) -> HfClipTokenizer:
    """An `HfClipTokenizer` with the vocabulary and merges of a CLIP tokenizer folder: `vocab.json` + `merges.txt`
    (older transformers and open_clip folders) or the BPE model inside `tokenizer.json` (transformers 5.x)."""
    folder = Path(folder)
    vocab_path, merges_path, tokenizer_path = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    if vocab_path.is_file() and merges_path.is_file():
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()
        merges = [_merge_pair(line) for line in lines if line and not line.startswith("#version")]
    elif tokenizer_path.is_file():
        bpe = json.loads(tokenizer_path.read_text(encoding="utf-8"))["model"]
        if bpe.get("type") != "BPE":
            raise ValueError(f"{tokenizer_path} holds a {bpe.get('type')} model, not CLIP's BPE.")
        vocab, merges = bpe["vocab"], [_merge_pair(merge) for merge in bpe["merges"]]
    else:
        raise FileNotFoundError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json.")
    return HfClipTokenizer(vocab=vocab, merges=merges)


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    left, right = merge.split() if isinstance(merge, str) else merge
    return left, right


def openai_processor(config: HfClipConfig, bpe_path: str | Path | None = None) -> HfClipProcessor:
    """OpenAI's preprocessing at the model's resolution and OpenAI's BPE vocabulary."""
    tokenizer = check_tokenizer(HfClipTokenizer.from_clip_bpe(bpe_path), config)
    return HfClipProcessor(
        image_processor=clip_image_processor(config.tower_configs()[1].image_size), tokenizer=tokenizer
    )


def open_clip_processor(
    config: HfClipConfig,
    preprocess_cfg: dict[str, Any] | None = None,
    folder: str | Path | None = None,
    bpe_path: str | Path | None = None,
) -> HfClipProcessor:
    """open_clip's preprocessing (`preprocess_cfg` of `open_clip_config.json`) and the folder's vocabulary, if any."""
    preprocess_cfg = preprocess_cfg or {}
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    if resize_mode != "shortest":
        raise ValueError(f"open_clip resize_mode {resize_mode!r} is not CLIP's shortest-side resize + centre crop.")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"open_clip interpolation {interpolation!r} is not one of {sorted(INTERPOLATIONS)}.")
    image_processor = clip_image_processor(
        config.tower_configs()[1].image_size,
        mean=preprocess_cfg.get("mean", OPENAI_CLIP_MEAN),
        std=preprocess_cfg.get("std", OPENAI_CLIP_STD),
        resample=INTERPOLATIONS[interpolation],
    )
    if folder is not None and has_vocabulary(folder):
        tokenizer = tokenizer_from_folder(folder)
    else:
        tokenizer = HfClipTokenizer.from_clip_bpe(bpe_path)
    return HfClipProcessor(image_processor=image_processor, tokenizer=check_tokenizer(tokenizer, config))
