"""The model side of the embedding job and of search: load any CLIP folder, preprocess one image at a time, and
turn inputs into the normalised embeddings that `hf_clip.zero_shot` computes."""

import os
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from ..data.fast_preprocessing import FastClipImagePreprocessor
from ..image_processing_hf_clip import HfClipImageProcessor, load_image_bytes
from ..saved_folders import check_model_folder
from ..zero_shot import encode_images, encode_texts

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
ImageInput = PIL.Image.Image | bytes | bytearray | str | os.PathLike


def embedding_dim(model: Any) -> int:
    """The joint embedding size of an HfClipModel or a transformers CLIPModel."""
    return int(model.config.projection_dim)


def load_clip(
    model_path: str, device: torch.device | str = "cpu", dtype: str = "float32", images: bool = True, text: bool = True
) -> tuple[Any, Any, Any]:
    """`(model, tokenizer, image_processor)` from an hf_clip or transformers CLIP folder; the parts not asked for
    are `None` (a folder saved for images only need not hold a tokenizer)."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}.")
    check_model_folder(model_path)
    model = AutoModel.from_pretrained(model_path, dtype=TORCH_DTYPES[dtype]).to(device).eval()
    for method in ("get_image_features", "get_text_features"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"{model_path} holds a {type(model).__name__}, not a CLIP model (no `{method}`).")
    tokenizer = AutoTokenizer.from_pretrained(model_path) if text else None
    image_processor = AutoImageProcessor.from_pretrained(model_path) if images else None
    return model, tokenizer, image_processor


class ImagePreprocessor:
    """One image (PIL, encoded bytes or a file path) → float32 `(3, height, width)` pixel values.

    hf_clip's processor goes through its bit-exact fast path; any other processor (transformers'
    `CLIPImageProcessor`) through its own `__call__`. Undecodable input raises `ValueError`.
    """

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor
        self.fast: FastClipImagePreprocessor | None = None
        if isinstance(image_processor, HfClipImageProcessor):
            try:
                self.fast = FastClipImagePreprocessor(image_processor)
            except ValueError:  # a non-default pipeline (no crop, ...): the processor itself handles it
                self.fast = None

    def __call__(self, image: ImageInput, name: str = "image") -> torch.Tensor:
        if not isinstance(image, PIL.Image.Image):
            image = load_image_bytes(image, name=name)
        if self.fast is not None:
            return self.fast([image])[0]
        return torch.as_tensor(self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0])


@torch.no_grad()
def image_embeddings(model: Any, pixel_values: torch.Tensor) -> np.ndarray:
    """Normalised float32 image embeddings as a NumPy array."""
    return encode_images(model, pixel_values).cpu().numpy()


@torch.no_grad()
def text_embeddings(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Normalised float32 text embeddings as a NumPy array."""
    return encode_texts(model, tokenizer, texts).cpu().numpy()
