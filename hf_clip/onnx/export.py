"""Export the image tower and the text tower of a CLIP folder to two ONNX files.

    hf-clip-export-onnx --model out/vit-b32 --output_dir out/vit-b32-onnx             # both towers
    hf-clip-export-onnx --model out/vit-b32 --output_dir out/images --towers vision   # an image service

Each file computes what `hf_clip.zero_shot.encode_images` / `encode_texts` compute, the L2-normalised projected
embedding, for any batch size: `vision_model.onnx` maps `pixel_values` (batch, 3, size, size) float32 to
`image_embeds` (batch, dim); `text_model.onnx` maps `input_ids` and `attention_mask` (batch, sequence ≤ the
context length) int64 to `text_embeds`. Both backbones (ViT, ResNet) and transformers' `CLIPModel` export alike.

The exporter is torch's own, `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript). The legacy
TorchScript exporter traces Python control flow with the example's values: the text tower skips building a padding
mask when the example has no padding, so a traced graph would silently ignore padding. optimum's ONNX exporter
does not support transformers 5. After writing, each file is run with onnxruntime on fresh random inputs and must
match PyTorch within 1e-4 (fp32), as the converters check their output before trusting it.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, HfArgumentParser
from transformers.hf_argparser import DataClassType

from ..saved_folders import check_model_folder
from ..zero_shot import pooled_features
from .folders import TEXT_FILE, TOWER_FILES, TOWERS, VISION_FILE

PARITY_ATOL = 1e-4
EXAMPLE_BATCH = 2  # the traced example; the exported batch dimension is dynamic


class ImageEmbeddingGraph(nn.Module):
    """pixel_values → normalised image embeddings: the graph exported as `vision_model.onnx`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = pooled_features(self.model.get_image_features(pixel_values=pixel_values))  # type: ignore[operator]
        return nn.functional.normalize(features, dim=-1)


class TextEmbeddingGraph(nn.Module):
    """(input_ids, attention_mask) → normalised text embeddings: the graph exported as `text_model.onnx`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)  # type: ignore[operator]
        return nn.functional.normalize(pooled_features(output), dim=-1)


def example_pixel_values(model: Any, batch_size: int, seed: int = 0) -> torch.Tensor:
    size = model.config.vision_config.image_size
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def example_text(model: Any, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids ending in EOS, every other row left with trailing padding (the padded path is what gets exported)."""
    text_config = model.config.text_config
    generator = torch.Generator().manual_seed(seed)
    length = min(8, text_config.max_position_embeddings)
    input_ids = torch.randint(0, text_config.vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    for row in range(batch_size):
        end = length if row % 2 == 0 else max(2, length // 2)
        input_ids[row, end - 1] = text_config.eos_token_id
        input_ids[row, end:] = text_config.pad_token_id or 0
        attention_mask[row, end:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def export_image_tower(model: Any, path: str | Path) -> Path:
    graph = ImageEmbeddingGraph(model).eval()
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        graph,
        (example_pixel_values(model, EXAMPLE_BATCH),),
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        dynamic_shapes={"pixel_values": {0: batch}},
        dynamo=True,
    )
    assert program is not None  # dynamo=True always returns the program
    program.save(str(path))
    return Path(path)


def export_text_tower(model: Any, path: str | Path) -> Path:
    graph = TextEmbeddingGraph(model).eval()
    context_length = model.config.text_config.max_position_embeddings
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=context_length)
    example = example_text(model, EXAMPLE_BATCH)
    program = torch.onnx.export(
        graph,
        (example["input_ids"], example["attention_mask"]),
        input_names=["input_ids", "attention_mask"],
        output_names=["text_embeds"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
        dynamo=True,
    )
    assert program is not None
    program.save(str(path))
    return Path(path)


@torch.no_grad()
def max_difference(
    model: Any, output_dir: str | Path, towers: Sequence[str] = TOWERS, batch_size: int = 3, seed: int = 1
) -> dict[str, float]:
    """Largest absolute difference between onnxruntime and PyTorch embeddings, per tower, on fresh random inputs."""
    import onnxruntime

    directory = Path(output_dir)
    pixel_values = example_pixel_values(model, batch_size, seed)
    text = example_text(model, batch_size, seed)
    checks = {
        VISION_FILE: (ImageEmbeddingGraph(model)(pixel_values), {"pixel_values": pixel_values}),
        TEXT_FILE: (TextEmbeddingGraph(model)(**text), text),
    }
    differences = {}
    for name, (expected, inputs) in checks.items():
        if name not in [TOWER_FILES[tower] for tower in towers]:
            continue
        session = onnxruntime.InferenceSession(str(directory / name), providers=["CPUExecutionProvider"])
        (actual,) = session.run(None, {key: value.numpy() for key, value in inputs.items()})
        differences[name] = float(np.abs(actual - expected.numpy()).max())
    return differences


def export_onnx(model_path: str, output_dir: str | Path, towers: Sequence[str] = TOWERS) -> dict[str, Any]:
    """Writes the towers (both by default), the tokenizer, the image processor and the config; checks the files
    against PyTorch; returns a report."""
    if not towers or not set(towers) <= set(TOWERS):
        raise ValueError(f"towers must name one or both of {TOWERS}, got {list(towers)}.")
    check_model_folder(model_path)
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if "vision" in towers:
        export_image_tower(model, directory / VISION_FILE)
    if "text" in towers:
        export_text_tower(model, directory / TEXT_FILE)
    differences = max_difference(model, directory, towers)
    failed = {name: value for name, value in differences.items() if not value <= PARITY_ATOL}
    if failed:
        raise RuntimeError(f"the exported files differ from PyTorch by more than {PARITY_ATOL}: {failed}.")
    # The processors (and the config, by which the Auto classes find them) travel with the graphs.
    model.config.save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(directory)
    AutoImageProcessor.from_pretrained(model_path).save_pretrained(directory)
    return {"model": model_path, "output_dir": str(directory), "max_abs_difference": differences}


@dataclass
class ExportCommand:
    model: str = field(metadata={"help": "An hf_clip or transformers CLIP folder."})
    output_dir: str = field(metadata={"help": "Where vision_model.onnx, text_model.onnx and processors go."})
    towers: list[str] = field(default_factory=lambda: list(TOWERS), metadata={"help": "vision and/or text"})


def main(argv: list[str] | None = None) -> None:
    (command,) = HfArgumentParser(DataClassType(ExportCommand)).parse_args_into_dataclasses(args=argv)
    print(json.dumps(export_onnx(command.model, command.output_dir, command.towers), indent=2))


if __name__ == "__main__":
    main()
