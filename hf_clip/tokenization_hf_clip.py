"""CLIP's byte-level BPE tokenizer on the `tokenizers` backend, with OpenAI's text cleaning.

Token ids equal open_clip's `SimpleTokenizer` (OpenAI's tokenizer) except at padding positions:

- Text cleaning is OpenAI's and runs in Python before the backend sees the text: `ftfy.fix_text`, `html.unescape`
  twice, whitespace collapsed, lower case. transformers' `CLIPTokenizer` does NFC + lower case instead, which
  differs on HTML entities, curly quotes, ligatures, full-width forms and mojibake.
- Words are split with OpenAI's pattern, byte-encoded and merged by BPE with a `</w>` end-of-word suffix.
- A literal `<|endoftext|>` (or `<|startoftext|>`) in a caption is ordinary text, as in open_clip.
- Padding: `<|endoftext|>` (id 49407 in the original vocabulary), as in transformers' CLIP tokenizers. OpenAI pads
  with id 0 (`!`). Padded positions are masked by `attention_mask`, and the text tower is causal and pools at the
  first end-of-text token, so text features do not depend on the padding id. Pass `pad_token="!"` for OpenAI's
  padded ids exactly.
- Truncation (`truncation=True`, at most `model_max_length=77`) keeps the end-of-text token last, as OpenAI does.
  `model_max_length` follows the model's text context (`check_tokenizer`), and `tokenize_captions` counts the
  captions it cut (or refuses them), so truncation is never silent.

Known residual differences, all outside real captions: code points assigned after Unicode 14 (the `regex` module
and the tokenizers library's regex engine classify some of them differently), U+0345 (dropped by OpenAI's
case-insensitive pattern), and open_clip's own special-token names `<start_of_text>` / `<end_of_text>`, which it
parses as special tokens inside text.
"""

import gzip
import html
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import ftfy
import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import BatchEncoding, TokenizersBackend

VOCAB_FILES_NAMES = {"tokenizer_file": "tokenizer.json"}
CLIP_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# Packages known to ship OpenAI's merges file next to their own tokenizer.
CLIP_BPE_PACKAGES = ("open_clip", "clip")
CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# What to do with a caption longer than the context: cut it (keeping the end-of-text token last), or refuse it.
OverflowPolicy = Literal["truncate", "error"]
OVERFLOW_POLICIES = ("truncate", "error")
# OpenAI's word pattern without its special-token alternatives: special tokens in text stay text.
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clean_text(text: str) -> str:
    """OpenAI's CLIP text cleaning: ftfy repairs, HTML entities unescaped twice, whitespace collapsed, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from the 256 byte values to printable characters (the BPE base alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values = printable[:]
    code_points = printable[:]
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + len(code_points) - len(printable))
    return {byte: chr(code_point) for byte, code_point in zip(byte_values, code_points, strict=True)}


def build_clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """OpenAI's vocabulary layout: 256 byte symbols, the same with `</w>`, one token per merge, then BOS and EOS."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [symbol + END_OF_WORD for symbol in alphabet] + ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the BPE merges produce duplicate tokens: not a CLIP merges list.")
    return vocab


def find_clip_bpe_file() -> Path:
    """Locate OpenAI's `bpe_simple_vocab_16e6.txt.gz` in an installed package, without importing the package."""
    for package in CLIP_BPE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            candidate = Path(folder) / CLIP_BPE_FILENAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"OpenAI's CLIP vocabulary ({CLIP_BPE_FILENAME}) was not found in any of the installed packages "
        f"{CLIP_BPE_PACKAGES}. Install open_clip_torch, or pass the file's path to `from_clip_bpe(path)`."
    )


def read_clip_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The 48,894 merges CLIP uses: the file's first line is a header and only the first merges are used."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    num_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    pairs = (line.split() for line in lines[1 : num_merges + 1])
    return [(left, right) for left, right in pairs]


def _backend(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str) -> Tokenizer:
    """The backend pipeline: lower case, OpenAI's word split, byte-level alphabet, BPE with `</w>` word ends."""
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=unk_token,
        )
    )
    # The full cleaning runs in Python (`clean_text`); lower-casing again here is a no-op for cleaned text and keeps
    # tokenizer.json close to CLIP when used on its own.
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            # use_regex=False: the words above are final; GPT-2's split must not run on them.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # Bytes back to text, then each `</w>` becomes the space it stood for (the last one dropped).
    backend.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace(END_OF_WORD, " "), decoders.Strip(" ", 0, 1)]
    )
    return backend


class HfClipTokenizer(TokenizersBackend):
    """CLIP tokenizer: OpenAI's cleaning, byte-level BPE with `</w>` word ends, `<|startoftext|> … <|endoftext|>`.

    Build it with `HfClipTokenizer.from_clip_bpe()` (OpenAI's vocabulary), `train_clip_bpe(texts, vocab_size)` (a new
    vocabulary) or `from_pretrained(folder)`. Text inputs must be strings (or lists of strings); `None` raises.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    model = BPE  # type: ignore[assignment]  # transformers declares None in the base class

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | None = None,
        unk_token: str = EOS_TOKEN,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        **kwargs: Any,
    ) -> None:
        # Without this check a folder lacking tokenizer.json would give a 2-token vocabulary.
        if not vocab or merges is None:
            raise ValueError(
                "HfClipTokenizer needs a vocabulary and merges: use HfClipTokenizer.from_clip_bpe(), "
                "train_clip_bpe(texts, vocab_size), or from_pretrained() on a folder that holds tokenizer.json."
            )
        missing = [str(token) for token in (bos_token, eos_token, unk_token) if str(token) not in vocab]
        missing += [symbol for symbol in bytes_to_unicode().values() if symbol not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks tokens a CLIP tokenizer needs: {missing[:8]}")
        self._tokenizer = _backend(vocab, [tuple(merge) for merge in merges], str(unk_token))  # type: ignore[misc]
        kwargs.setdefault("model_max_length", CLIP_CONTEXT_LENGTH)
        # Special tokens are matched by id only, never in the text: a literal "<|endoftext|>" is text.
        kwargs["split_special_tokens"] = True
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, **kwargs)
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A {eos_token}",
            pair=f"{bos_token} $A {eos_token} $B:1 {eos_token}:1",
            special_tokens=[(str(bos_token), self.bos_token_id), (str(eos_token), self.eos_token_id)],
        )

    @classmethod
    def from_clip_bpe(cls, path: str | os.PathLike | None = None, **kwargs: Any) -> "HfClipTokenizer":
        """OpenAI's tokenizer from `bpe_simple_vocab_16e6.txt.gz` (`path=None`: found in open_clip or clip)."""
        merges = read_clip_merges(path if path is not None else find_clip_bpe_file())
        vocab = build_clip_vocab(merges)
        if len(vocab) != CLIP_VOCAB_SIZE:
            raise ValueError(f"{path} gives a {len(vocab)}-token vocabulary; CLIP's has {CLIP_VOCAB_SIZE}.")
        return cls(vocab=vocab, merges=merges, **kwargs)

    def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        # Every encoding path (__call__, encode, tokenize, batches) goes through here: clean once, in Python.
        return super()._encode_plus(_cleaned(text), _cleaned(text_pair) if text_pair is not None else None, **kwargs)


def check_tokenizer(tokenizer: TokenizersBackend, config: Any) -> TokenizersBackend:
    """The tokenizer must produce the ids the text tower was built for (vocabulary size, BOS, EOS: an id outside the
    vocabulary or a caption without the tower's EOS cannot be embedded); its context becomes the model's.

    `config` is an `HfClipConfig` (or anything with `tower_configs()`)."""
    text_config = config.tower_configs()[0]
    found = (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    wanted = (text_config.vocab_size, text_config.bos_token_id, text_config.eos_token_id)
    if found != wanted:
        raise ValueError(
            f"tokenizer (vocabulary {found[0]}, BOS {found[1]}, EOS {found[2]}) does not fit the model (vocabulary "
            f"{wanted[0]}, BOS {wanted[1]}, EOS {wanted[2]}): pass the vocabulary this checkpoint was trained with."
        )
    tokenizer.model_max_length = text_config.max_position_embeddings
    return tokenizer


def overlong_captions(
    tokenizer: Any, texts: Sequence[str], attention_mask: Any | None, max_length: int
) -> dict[int, int]:
    """The captions of a batch tokenized with truncation at `max_length` that were cut, as row → untruncated token
    count. A cut caption fills exactly `max_length` tokens, so only the rows that do (all rows when the batch has no
    `attention_mask`) are tokenized again, without truncation: counting costs nothing for captions that fit."""
    if attention_mask is None:
        lengths = [max_length] * len(texts)
    elif isinstance(attention_mask, torch.Tensor | np.ndarray):  # return_tensors="pt" / "np"
        lengths = np.asarray(attention_mask).reshape(len(texts), -1).sum(axis=-1).tolist()
    else:  # lists, one per caption (or one flat list for a single caption)
        rows = attention_mask if attention_mask and isinstance(attention_mask[0], list) else [attention_mask]
        lengths = [sum(row) for row in rows]
    candidates = [row for row, length in enumerate(lengths) if length >= max_length]
    if not candidates:
        return {}
    full = tokenizer([texts[row] for row in candidates], truncation=False, padding=False, verbose=False)["input_ids"]
    return {row: len(ids) for row, ids in zip(candidates, full, strict=True) if len(ids) > max_length}


def check_overflow(overlong: dict[int, int], max_length: int, on_overflow: OverflowPolicy) -> int:
    """The number of cut captions; with `on_overflow="error"` a clear error naming them instead."""
    if on_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}.")
    if overlong and on_overflow == "error":
        shown = dict(list(overlong.items())[:8])
        raise ValueError(
            f"captions longer than the {max_length} tokens the model reads ({len(overlong)} in all; row: tokens "
            f"{shown}): shorten them, pass on_overflow='truncate' to cut them (the end-of-text token is kept), or "
            "stretch the model's context (HfClipModel.stretch_text_positions)."
        )
    return len(overlong)


def tokenize_captions(
    tokenizer: Any, captions: Sequence[str], on_overflow: OverflowPolicy = "truncate"
) -> tuple[BatchEncoding, int]:
    """`tokenizer(captions, padding=True, truncation=True, return_tensors="pt")` and how many captions were cut to
    the tokenizer's `model_max_length` (`on_overflow="error"`: a ValueError naming them instead)."""
    tokens = tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt")
    max_length = tokenizer.model_max_length
    overlong = overlong_captions(tokenizer, captions, tokens.get("attention_mask"), max_length)
    return tokens, check_overflow(overlong, max_length, on_overflow)


def _cleaned(text: Any) -> Any:
    """`clean_text` over a string or a (nested) list of strings; anything else raises a clear error."""
    if isinstance(text, str):
        return clean_text(text)
    if isinstance(text, (list, tuple)):
        return [_cleaned(item) for item in text]
    raise TypeError(f"HfClipTokenizer takes a string or a list of strings, got {type(text).__name__}.")


def train_clip_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    model_max_length: int = CLIP_CONTEXT_LENGTH,
) -> HfClipTokenizer:
    """Train a new CLIP-style BPE vocabulary on a caption corpus with the `tokenizers` trainer.

    The result has OpenAI's layout and pipeline: 256 byte symbols, the same with `</w>`, one token per merge,
    then `<|startoftext|>` and `<|endoftext|>` as the last two ids (read them from `tokenizer.bos_token_id` and
    `eos_token_id` for the model config, and `len(tokenizer)` for its `vocab_size`). `vocab_size` is an upper bound:
    a small corpus may support fewer merges.
    """
    num_merges = vocab_size - 2 * 256 - 2
    if num_merges < 1:
        raise ValueError(f"vocab_size must exceed {2 * 256 + 2} (the byte alphabet and two special tokens).")
    alphabet = list(bytes_to_unicode().values())
    # An empty model with CLIP's pipeline (its unknown token is never used: every byte is in the alphabet).
    backend = _backend({symbol: index for index, symbol in enumerate(alphabet)}, [], alphabet[0])
    trainer = BpeTrainer(
        # The trainer counts its own alphabet (at most 512 symbols) in vocab_size: this leaves room for num_merges.
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
    )
    backend.train_from_iterator((_cleaned(text) for text in texts), trainer=trainer)
    # Merges are in rank order, so the first `num_merges` are exactly the model trained that far.
    trained_merges = json.loads(backend.to_str())["model"]["merges"]
    merges: list[tuple[str, str]] = [(left, right) for left, right in trained_merges[:num_merges]]
    return HfClipTokenizer(vocab=build_clip_vocab(merges), merges=merges, model_max_length=model_max_length)


__all__ = [
    "OVERFLOW_POLICIES",
    "HfClipTokenizer",
    "check_tokenizer",
    "clean_text",
    "overlong_captions",
    "tokenize_captions",
    "train_clip_bpe",
]
