"""What an inference folder of hf_clip holds, readable without onnx installed (training imports it to refuse such
folders by name).

An ONNX folder (`hf-clip-export-onnx`) holds `vision_model.onnx` and/or `text_model.onnx` beside the config and the
processors, and no trainable weights; an int8 folder (`hf-clip-quantize`) holds the same files, quantised, and
`quantization.json` saying how.
"""

import json
from pathlib import Path
from typing import Any

VISION_FILE = "vision_model.onnx"
TEXT_FILE = "text_model.onnx"
TOWER_FILES = {"vision": VISION_FILE, "text": TEXT_FILE}
TOWERS = tuple(TOWER_FILES)
QUANTIZATION_FILE = "quantization.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def onnx_towers(folder: str | Path) -> list[str]:
    """The towers (`vision`, `text`) whose ONNX file `folder` holds."""
    return [tower for tower, name in TOWER_FILES.items() if (Path(folder) / name).is_file()]


def quantization(folder: str | Path) -> dict[str, Any] | None:
    """The folder's `quantization.json` (how its towers were quantised), or None for an fp32 folder."""
    path = Path(folder) / QUANTIZATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_trainable(folder: str | Path) -> None:
    """Raises when `folder` is an ONNX inference folder (fp32 or int8): its graphs cannot be trained, and it holds
    no PyTorch weights to start from."""
    path = Path(folder)
    if not path.is_dir() or not onnx_towers(path) or any((path / name).is_file() for name in WEIGHT_FILES):
        return
    kind = "an int8 ONNX folder (hf-clip-quantize)" if quantization(path) else "an ONNX folder (hf-clip-export-onnx)"
    raise ValueError(
        f"{path} is {kind} for inference: it holds no trainable weights. Train from the hf_clip model folder it was "
        "made from, and quantise the trained model afterwards."
    )
