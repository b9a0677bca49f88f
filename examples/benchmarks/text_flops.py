"""FLOPs per training step with the text batch in three layouts: padded to the 77-token context (what the benchmark
anchors and `CLIPModel` callers send), trimmed to the batch's longest caption (`trim_to_longest`), and packed
without padding (`pack_text` → `HfClipModel.get_packed_text_features`, what the training loop sends).

    python examples/benchmarks/text_flops.py                                   # ViT-B/32, batch 512
    python examples/benchmarks/text_flops.py --captions Validation_GCC-1.1.0-Validation.tsv   # re-derive the lengths

Two caption-length distributions:

- `anchor`: the benchmark anchors' batch (`benchmark.py:synthetic_batch`, EOS uniformly at position 5..75 of 77);
- `real`: lengths drawn from `REAL_CAPTION_LENGTHS`, the histogram of the 15,833 captions of Conceptual Captions'
  validation split (Sharma et al., 2018; web alt-text, the kind of caption CLIP trains on) tokenized with OpenAI's
  tokenizer (`HfClipTokenizer.from_clip_bpe()`), BOS and EOS included. `--captions FILE` (one caption per line,
  text before the first tab) recomputes it from a file and prints it.

Counting: `FlopCounterMode` over forward + loss + backward on meta tensors (shapes only; bf16 weights, so the packed
batch takes the varlen kernel it takes on a GPU). The text tower's figure is the text side alone: its forward and
the backward from its embeddings. Attention is counted with torch's dense formula in every layout (a causal
kernel does about half of it): batch × seq_len² padded or trimmed, the sum of squared caption lengths packed. A
meta run cannot read the caption boundaries, so the varlen formula is given the lengths, and the packed count is
checked to equal the sum, over captions, of the text tower's FLOPs on each caption alone.
"""

import argparse
import collections
import functools
import json
from pathlib import Path

import torch
from benchmark import DEFAULT_BATCH, load_config, synthetic_batch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from hf_clip import ClipLoss, HfClipConfig, HfClipModel, HfClipTokenizer
from hf_clip.data.text_batching import pack_text, trim_to_longest
from hf_clip.synthetic import random_captions
from hf_clip.training.objective import ClipObjective
from hf_clip.training.steps import ClipEmbedder

# Tokens per caption (BOS and EOS included) → number of captions, Conceptual Captions validation split, 15,833 captions
# (`--captions` on `Validation_GCC-1.1.0-Validation.tsv` prints it). Mean 12.6 tokens, median 11, longest 48.
REAL_CAPTION_LENGTHS = {
    7: 1216, 8: 1754, 9: 1809, 10: 1749, 11: 1567, 12: 1299, 13: 1146, 14: 889, 15: 867, 16: 644, 17: 602, 18: 433,
    19: 386, 20: 279, 21: 259, 22: 212, 23: 160, 24: 112, 25: 91, 26: 54, 27: 67, 28: 48, 29: 29, 30: 35, 31: 22,
    32: 37, 33: 17, 34: 14, 35: 7, 36: 6, 37: 9, 38: 4, 39: 2, 40: 1, 41: 1, 42: 3, 45: 2, 48: 1,
}  # fmt: skip
LAYOUTS = ("padded", "trimmed", "packed")
Batch = dict[str, torch.Tensor]


def caption_lengths(path: Path) -> dict[int, int]:
    """Histogram of token counts (BOS and EOS included, truncated at 77) of a caption file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    captions = [line.split("\t")[0] for line in lines if line.strip()]
    tokenized = HfClipTokenizer.from_clip_bpe()(captions, truncation=True)["input_ids"]
    return dict(sorted(collections.Counter(len(ids) for ids in tokenized).items()))


def real_batch(batch_size: int, config: HfClipConfig, histogram: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions whose lengths are drawn from `histogram` (seeded), padded to the context as the tokenizer pads."""
    text = config.tower_configs()[0]
    lengths, counts = zip(*histogram.items(), strict=True)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.multinomial(torch.tensor(counts, dtype=torch.float), batch_size, True, generator=generator)
    return random_captions(
        batch_size,
        text.max_position_embeddings,
        text.bos_token_id or 0,
        text.eos_token_id,
        lengths=torch.tensor(lengths)[drawn],
        generator=generator,
    )


def text_layout(layout: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Batch:
    """The text part of a training batch (CPU tensors) as the step receives it; no mask, as the training steps."""
    if layout == "padded":
        return {"input_ids": input_ids}
    if layout == "trimmed":
        return {"input_ids": trim_to_longest(input_ids, attention_mask)[0]}
    return pack_text(input_ids, attention_mask)._asdict()


def counter(lengths: list[int]) -> FlopCounterMode:
    """A FLOP counter whose varlen attention formulas use the real caption lengths (a meta run cannot read them).

    Its backward is counted as twice its forward, the count of the padded layouts' attention on meta tensors (sdpa's
    math kernel: four matmuls back for two forward), so the layouts compare at one convention."""

    def forward(query, *args, **kwargs) -> int:
        _, heads, head_dim = query
        return sum(sdpa_flop_count(*[(1, heads, length, head_dim)] * 3) for length in lengths)

    def backward(grad_out, query, *args, **kwargs) -> int:
        return 2 * forward(query)

    varlen = torch.ops.torch_attn
    return FlopCounterMode(
        display=False, custom_mapping={varlen._varlen_attn: forward, varlen._varlen_attn_backward: backward}
    )


def count(embedder: ClipEmbedder, batch: Batch, lengths: list[int], text_only: bool) -> tuple[int, bool]:
    """FLOPs of forward + backward (text side alone, or the whole step with its loss) and whether varlen ran."""
    batch = {name: tensor.to("meta") for name, tensor in batch.items()}
    with counter(lengths) as flop_counter:
        if text_only:
            text_inputs = {name: value for name, value in batch.items() if name != "pixel_values"}
            embedder(**text_inputs).text_embeds.float().sum().backward()
        else:
            ClipObjective(embedder, ClipLoss())(batch).loss.backward()
    ops = flop_counter.get_flop_counts()["Global"]
    return flop_counter.get_total_flops(), torch.ops.torch_attn._varlen_attn in ops


def rows_for(name: str, embedder: ClipEmbedder, pixel_values: torch.Tensor, text: tuple) -> list[dict]:
    input_ids, attention_mask = text
    lengths = attention_mask.sum(dim=1).tolist()

    @functools.cache
    def alone(length: int) -> int:  # one caption of `length` tokens (their values do not change the count)
        return count(embedder, {"input_ids": torch.zeros(1, length, dtype=torch.long)}, [length], text_only=True)[0]

    rows = []
    for layout in LAYOUTS:
        batch = text_layout(layout, input_ids, attention_mask)
        text_flops, varlen = count(embedder, batch, lengths, text_only=True)
        step_flops, _ = count(embedder, {"pixel_values": pixel_values, **batch}, lengths, text_only=False)
        # The packed tower does each caption's own work and nothing else.
        if layout == "packed" and (not varlen or text_flops != sum(alone(length) for length in lengths)):
            raise AssertionError(f"packed text FLOPs {text_flops} are not the sum over captions (varlen: {varlen})")
        tokens = batch["input_ids"].numel()
        rows.append(
            {
                "captions": name,
                "layout": layout,
                "text_tokens": tokens,
                "text_flops": text_flops,
                "step_flops": step_flops,
            }
        )
    return rows


def markdown(rows: list[dict], batch_size: int, arch: str) -> str:
    lines = [
        f"| captions ({arch}, batch {batch_size}) | text layout | text tokens | text tower fwd+bwd (GFLOP) | "
        "vs padded | whole step (TFLOP) | vs padded |",
        "|---|---|---|---|---|---|---|",
    ]
    padded = {row["captions"]: row for row in rows if row["layout"] == "padded"}
    for row in rows:
        reference = padded[row["captions"]]
        lines.append(
            f"| {row['captions']} | {row['layout']} | {row['text_tokens']:,} | {row['text_flops'] / 1e9:,.0f} | "
            f"{row['text_flops'] / reference['text_flops']:.2f}x | {row['step_flops'] / 1e12:.2f} | "
            f"{row['step_flops'] / reference['step_flops']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32", help="a published architecture or an hf_clip config JSON")
    parser.add_argument("--batch-size", type=int, help="default: the anchors' batch for the architecture")
    parser.add_argument("--captions", type=Path, help="caption file to take the real length histogram from")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    config = load_config(args.arch)
    batch_size = args.batch_size or DEFAULT_BATCH.get(Path(args.arch).stem, 8)
    histogram = REAL_CAPTION_LENGTHS
    if args.captions is not None:
        histogram = caption_lengths(args.captions)
        print(f"caption lengths of {args.captions} ({sum(histogram.values())} captions): {histogram}")

    with torch.device("meta"):
        model = HfClipModel._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    embedder = ClipEmbedder(model).train()
    torch.manual_seed(0)
    pixel_values, *anchor_text = synthetic_batch(batch_size, config, torch.device("cpu"))
    pixel_values = pixel_values.to(torch.bfloat16)
    rows = rows_for("anchor (6-76 tokens)", embedder, pixel_values, tuple(anchor_text))
    real_text = real_batch(batch_size, config, histogram)
    longest = int(real_text[1].sum(dim=1).max())
    source = "Conceptual Captions val" if args.captions is None else args.captions.name
    rows += rows_for(f"real ({source}, longest {longest})", embedder, pixel_values, real_text)
    print(markdown(rows, batch_size, Path(args.arch).stem))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
