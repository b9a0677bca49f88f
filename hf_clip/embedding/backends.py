"""The inference backends of the embedding job and of search: one interface over PyTorch and onnxruntime.

| backend | `--model` is | runs |
|---|---|---|
| `torch` | an hf_clip or transformers CLIP folder | the PyTorch model (any device, `model_dtype`) |
| `torch-int8` | the same fp32 folder | the model with its `nn.Linear` layers dynamically quantised on load (CPU) |
| `onnx` | an `hf-clip-export-onnx` folder | the fp32 ONNX towers with onnxruntime (CPU) |
| `onnx-int8` | an `hf-clip-quantize` folder | the int8 ONNX towers with onnxruntime (CPU) |

Every backend embeds preprocessed pixels and raw texts into normalised float32 NumPy rows through the folder's own
processors, so the job's output layout does not depend on the backend.
"""

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..onnx.folders import TEXT_FILE, VISION_FILE, WEIGHT_FILES, onnx_towers, quantization
from .encoders import ImagePreprocessor, embedding_dim, image_embeddings, load_clip, text_embeddings

BACKENDS = ("torch", "torch-int8", "onnx", "onnx-int8")
ONNX_BACKENDS = ("onnx", "onnx-int8")


class ClipEncoder(Protocol):
    """What the job and search need from a backend (`OnnxClipEmbedder` is one as it stands)."""

    embedding_dim: int

    @property
    def preprocess(self) -> ImagePreprocessor | None: ...

    def embed_pixel_values(self, pixel_values: torch.Tensor) -> np.ndarray: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


class TorchEncoder:
    """A PyTorch CLIP model (fp32, half precision or int8-quantised) and its processors."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.embedding_dim = embedding_dim(model)
        self.preprocess = ImagePreprocessor(image_processor) if image_processor is not None else None

    def embed_pixel_values(self, pixel_values: torch.Tensor) -> np.ndarray:
        return image_embeddings(self.model, pixel_values)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return text_embeddings(self.model, self.tokenizer, texts)


def check_backend(backend: str, device: torch.device | str = "cpu", dtype: str = "float32") -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend != "torch" and (torch.device(device).type != "cpu" or dtype != "float32"):
        raise ValueError(f"backend {backend!r} runs float32 inputs on the CPU; got device {device}, dtype {dtype}.")


def check_folder(model_path: str, backend: str, images: bool = True, text: bool = True) -> None:
    """Raises, naming the folder and the backend, when the folder is not the kind the backend loads."""
    folder = Path(model_path)
    towers = onnx_towers(folder) if folder.is_dir() else []
    if backend not in ONNX_BACKENDS:
        if towers and not any((folder / name).is_file() for name in WEIGHT_FILES):
            raise ValueError(
                f"{model_path} is an ONNX folder without PyTorch weights: use backend 'onnx' or 'onnx-int8', or "
                f"point backend {backend!r} at the model folder."
            )
        return
    if not towers:
        make = "hf-clip-export-onnx" if backend == "onnx" else "hf-clip-quantize"
        raise FileNotFoundError(
            f"backend {backend!r} needs an ONNX folder: {model_path} holds neither {VISION_FILE} nor {TEXT_FILE} "
            f"(make one from the model folder with {make})."
        )
    quantized = quantization(folder) is not None
    if backend == "onnx" and quantized:
        raise ValueError(f"{model_path} holds int8 towers (hf-clip-quantize): use backend 'onnx-int8'.")
    if backend == "onnx-int8" and not quantized:
        raise ValueError(f"{model_path} holds fp32 ONNX towers: quantise them with hf-clip-quantize, or use 'onnx'.")
    for wanted, tower, name in ((images, "vision", VISION_FILE), (text, "text", TEXT_FILE)):
        if wanted and tower not in towers:
            raise FileNotFoundError(f"{model_path} has no {name}: it was made without the {tower} tower.")


def load_encoder(
    model_path: str,
    backend: str = "torch",
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    images: bool = True,
    text: bool = True,
) -> ClipEncoder:
    """The encoder of `model_path` for `backend` (checked first, so a wrong folder fails with its name)."""
    check_backend(backend, device, dtype)
    check_folder(model_path, backend, images, text)
    if backend in ONNX_BACKENDS:
        from ..onnx.runtime import OnnxClipEmbedder  # onnxruntime is the `onnx` extra

        return OnnxClipEmbedder(model_path)
    model, tokenizer, image_processor = load_clip(model_path, device, dtype, images=images, text=text)
    if backend == "torch-int8":
        from ..onnx.quantize import quantize_torch

        model = quantize_torch(model)
    return TorchEncoder(model, tokenizer, image_processor)
