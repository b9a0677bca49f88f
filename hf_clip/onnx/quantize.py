"""Int8 towers for CPU inference, from any hf_clip (or transformers CLIP) folder.

    hf-clip-quantize --model out/vit-b32 --output_dir out/vit-b32-int8                      # dynamic, both towers
    hf-clip-quantize --model out/rn50 --output_dir out/rn50-int8 --method static \\
        --calibration_images photos/ --calibration_size 128                                  # static image tower

The output is an ONNX folder like `hf-clip-export-onnx`'s (same file names, the config and processors beside them)
whose graphs are onnxruntime-quantised, plus `quantization.json` recording how; `OnnxClipEmbedder` and the embedding
backend `onnx-int8` load it. `--model` may also be an ONNX folder already exported (then nothing is re-exported).

- `dynamic` (onnxruntime `quantize_dynamic`): weights of every MatMul/Gemm stored as int8 per output channel,
  activations quantised on the fly per tensor; needs no data. ResNet convolutions stay fp32 (ConvInteger is slower
  than fp32 Conv), so it helps ViT image towers and text towers.
- `static` (onnxruntime `quantize_static`, QDQ format): the image tower's activation ranges are calibrated on the
  user's own images (MinMax over `calibration_size` of them, run through the folder's image processor), so the
  weighted matmuls and the convolutions run in int8 with fixed scales; the text tower stays dynamic (no captions to
  calibrate on). Measured on full-size ViT-B/32 and RN50 (examples/benchmarks/RESULTS.md) it is the faster of the
  two at the same cosine to fp32, and the only one that speeds up ResNet: use it when you have images.

`quantize_torch` is the no-ONNX path: torch's dynamic quantisation of every `nn.Linear` (int8 weights, activations
quantised per batch). It leaves convolutions in fp32, so a ResNet image tower gains little; the embedding backend
`torch-int8` applies it to an fp32 folder when loading, so it needs no files of its own.
"""

import json
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, HfArgumentParser
from transformers.hf_argparser import DataClassType

from ..embedding.encoders import ImageInput, ImagePreprocessor
from .folders import QUANTIZATION_FILE, TEXT_FILE, TOWER_FILES, TOWERS, VISION_FILE, onnx_towers

METHODS = ("dynamic", "static")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Dynamic quantisation of the matmuls that carry weights (attention's activation × activation MatMuls stay fp32).
# Not Conv: onnxruntime's ConvInteger ran a full-size RN50 image tower at 0.48× eager fp32 (examples/benchmarks/
# RESULTS.md), so ResNet convolutions are int8 only through static quantisation.
DYNAMIC_OPS = ["MatMul", "Gemm"]
# Static quantisation of the same matmuls and the convolutions only: with every op quantised (LayerNorm inputs,
# residual adds, softmax) a full-size ViT-B/32's image embeddings fell to cosine 0.88 of fp32; with these, 0.9997.
STATIC_OPS = ["MatMul", "Gemm", "Conv"]
CALIBRATION_BATCH = 16


def quantize_torch(model: nn.Module) -> nn.Module:
    """`model` with every `nn.Linear` replaced by torch's dynamically quantised int8 Linear (a new module)."""
    # torch.ao.quantization is deprecated in favour of torchao but still ships; torchao is not a dependency.
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def calibration_files(images: str | Sequence[str], size: int, seed: int = 0) -> list[str]:
    """`size` image files drawn (seeded) from a folder (searched recursively) or a list of files."""
    if isinstance(images, str):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"calibration_images: {images} is not a folder.")
        files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    else:
        files = list(images)
    if not files:
        raise ValueError(f"calibration_images: no image files in {images}.")
    random.Random(seed).shuffle(files)
    return files[:size]


class PixelCalibration:
    """onnxruntime's `CalibrationDataReader` protocol over preprocessed batches of calibration images."""

    def __init__(self, images: Sequence[ImageInput], preprocess: ImagePreprocessor, batch_size: int):
        self.batches = self._batches(images, preprocess, batch_size)

    @staticmethod
    def _batches(
        images: Sequence[ImageInput], preprocess: ImagePreprocessor, batch_size: int
    ) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([preprocess(image, name=str(image)) for image in images[start : start + batch_size]])
            yield {"pixel_values": pixels.numpy()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_tower(
    source: Path, target: Path, method: str, calibration: PixelCalibration | None = None, per_channel: bool = True
) -> None:
    """One ONNX file quantised into `target` (static needs `calibration`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    with tempfile.TemporaryDirectory() as scratch:
        # Shape inference and graph fusion first, as onnxruntime's quantisation guide asks (it finds more MatMuls).
        prepared = Path(scratch) / source.name
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        if method == "dynamic":
            ort_quantize_dynamic(prepared, target, DYNAMIC_OPS, per_channel=per_channel, weight_type=QuantType.QInt8)
            return
        assert calibration is not None
        ort_quantize_static(
            prepared,
            target,
            calibration,  # onnxruntime reads it through get_next()
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=STATIC_OPS,
        )


def quantize_onnx(
    model_path: str,
    output_dir: str | Path,
    method: str = "dynamic",
    calibration_images: str | Sequence[str] | None = None,
    calibration_size: int = 128,
    towers: Sequence[str] = TOWERS,
    per_channel: bool = True,
) -> dict[str, Any]:
    """Writes int8 ONNX towers, the config, the processors and `quantization.json` to `output_dir`; returns that
    record. `model_path` is an hf_clip/transformers CLIP folder (exported first) or an ONNX folder."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if not towers or not set(towers) <= set(TOWERS):
        raise ValueError(f"towers must name one or both of {TOWERS}, got {list(towers)}.")
    if method == "static" and "vision" in towers and calibration_images is None:
        raise ValueError("static quantisation calibrates on your images: pass calibration_images (a folder).")
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"{model_path} is not a folder: pass an hf_clip model folder or an ONNX folder.")
    directory = Path(output_dir)
    if Path(model_path).resolve() == directory.resolve():
        raise ValueError(f"output_dir must differ from the model folder {model_path}.")
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(model_path)
        if not onnx_towers(source):
            from .export import export_onnx

            export_onnx(model_path, scratch, towers)
            source = Path(scratch)
        missing = [tower for tower in towers if not (source / TOWER_FILES[tower]).is_file()]
        if missing:
            raise FileNotFoundError(f"{model_path} has no ONNX file for the {missing} tower(s).")
        directory.mkdir(parents=True, exist_ok=True)
        image_processor = AutoImageProcessor.from_pretrained(source)
        record: dict[str, Any] = {"precision": "int8", "source": str(Path(model_path).resolve()), "towers": {}}
        if "vision" in towers:
            calibration = None
            if method == "static":
                assert calibration_images is not None
                files = calibration_files(calibration_images, calibration_size)
                calibration = PixelCalibration(files, ImagePreprocessor(image_processor), CALIBRATION_BATCH)
                record["calibration_images"] = len(files)
            quantize_tower(source / VISION_FILE, directory / VISION_FILE, method, calibration, per_channel)
            record["towers"]["vision"] = method
        if "text" in towers:
            quantize_tower(source / TEXT_FILE, directory / TEXT_FILE, "dynamic", per_channel=per_channel)
            record["towers"]["text"] = "dynamic"
        record["per_channel"] = per_channel
        # The processors and the config travel with the graphs, as export_onnx writes them.
        AutoConfig.from_pretrained(source).save_pretrained(directory)
        AutoTokenizer.from_pretrained(source).save_pretrained(directory)
        image_processor.save_pretrained(directory)
    (directory / QUANTIZATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


@dataclass
class QuantizeCommand:
    model: str = field(metadata={"help": "An hf_clip or transformers CLIP folder, or an hf-clip-export-onnx folder."})
    output_dir: str = field(metadata={"help": "Where the int8 vision_model.onnx, text_model.onnx and processors go."})
    method: str = field(default="dynamic", metadata={"help": "dynamic | static (calibrated image tower)"})
    calibration_images: str | None = field(default=None, metadata={"help": "static: a folder of your images."})
    calibration_size: int = field(default=128, metadata={"help": "static: how many of them calibrate."})
    towers: list[str] = field(default_factory=lambda: list(TOWERS), metadata={"help": "vision and/or text"})


def main(argv: list[str] | None = None) -> None:
    (command,) = HfArgumentParser(DataClassType(QuantizeCommand)).parse_args_into_dataclasses(args=argv)
    record = quantize_onnx(
        command.model,
        command.output_dir,
        command.method,
        command.calibration_images,
        command.calibration_size,
        command.towers,
    )
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
