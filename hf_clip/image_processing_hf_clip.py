"""CLIP image processor on transformers' PIL backend: OpenAI's preprocessing, bit for bit, without torchvision.

Evaluation (`__call__`): resize the shortest side to 224 (bicubic, PIL), centre-crop 224×224, rescale to [0, 1],
normalise with OpenAI's mean and std. Two details make the output equal OpenAI's / open_clip's eval transform
exactly: the crop offset is `int(round((L - crop) / 2))` with Python's rounding (transformers floors it, shifting
a quarter of random sizes by one pixel), and rescale/normalise run in float32 as `ToTensor` + `Normalize` do.

Training (`preprocess_for_training`): the paper's only augmentation, a random square crop of the resized image.

Input policy for PIL images (applied before resizing; OpenAI converts to RGB after resizing, which gives the same
result for RGB and grayscale input):

- EXIF orientation is applied (OpenAI ignores it, so phone photos reach its model rotated).
- Grayscale (`L`, `1`), palette (`P`), CMYK and YCbCr images are converted to RGB with PIL; grayscale is replicated
  to three channels. OpenAI resizes palette and 1-bit images with nearest-neighbour (PIL ignores bicubic for those
  modes); here they are resized bicubic like every other image.
- Transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is composited onto white, as transformers'
  `convert_to_rgb` does (OpenAI drops alpha after a premultiplied resize, which turns transparent areas black).
- 16-bit grayscale (`I;16*`, and `I`, read as the 16-bit range) is scaled to 8 bits as `round(value / 257)`, so a
  16-bit image of 8-bit values times 257 processes exactly like the 8-bit image (PIL's own conversion clips at 255,
  which turns most 16-bit images white). 32-bit float (`F`) images have no defined range and are rejected.
- A 1×1 image is upsampled like any other (a uniform 224×224 crop).
- Undecodable input (truncated files, bytes that are no image) raises `ValueError` naming the problem; encoded
  bytes and file paths are accepted as inputs.

NumPy arrays and torch tensors are taken as transformers takes them (uint8 RGB or grayscale, channels first or
last). The backend is pinned: `AutoImageProcessor` resolves this class for every backend name, so a saved
processor never switches to torchvision, whose resize differs numerically.
"""

import io
import os
from pathlib import Path
from typing import Any, cast

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def load_image_bytes(data: bytes | bytearray | str | os.PathLike, name: str = "image bytes") -> PIL.Image.Image:
    """Open and fully decode an encoded image; truncated or non-image data raises a `ValueError` saying so."""
    try:
        image = PIL.Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    except PIL.UnidentifiedImageError as error:
        raise ValueError(f"{name} is not an image in a format PIL can read ({error}).") from error
    return decoded(image, name)


def decoded(image: PIL.Image.Image, name: str = "image") -> PIL.Image.Image:
    """Force PIL's lazy decoding now, so a truncated or corrupt file fails here with a clear message."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        kind = "truncated" if "truncated" in str(error) else "corrupt"
        raise ValueError(f"{name} could not be decoded: the file looks {kind} ({error}).") from error
    return image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """The input policy (module docstring) for a decoded, upright image: 16-bit scaling, alpha onto white, RGB."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = PIL.Image.fromarray(np.rint(values / 257).astype(np.uint8))  # 2-D uint8: mode L
    elif image.mode == "F":
        raise ValueError("32-bit float images have no defined value range; convert them to 8-bit RGB first.")
    try:
        if image.mode in ALPHA_MODES or "transparency" in image.info:
            white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"cannot convert a {image.mode} image to RGB ({error}).") from error


class HfClipImageProcessor(PilBackend):
    """OpenAI CLIP preprocessing (224 px by default) with the input policy above; outputs `pixel_values`."""

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Also accept encoded bytes and local file paths, decoded with clear errors."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (bytes, bytearray)):
            return load_image_bytes(image_url_or_urls)
        if isinstance(image_url_or_urls, (str, os.PathLike)) and Path(image_url_or_urls).is_file():
            return load_image_bytes(image_url_or_urls, name=str(image_url_or_urls))
        return super().fetch_images(image_url_or_urls)

    def process_image(
        self, image: Any, do_convert_rgb: bool | None = None, input_data_format: Any = None, **kwargs: Any
    ) -> np.ndarray:
        if not isinstance(image, PIL.Image.Image):
            array = super().process_image(image, do_convert_rgb, input_data_format, **kwargs)
        else:
            image = ImageOps.exif_transpose(decoded(image))
            if do_convert_rgb:
                image = to_rgb(image)
            array = super().process_image(image, False, input_data_format, **kwargs)
        if 0 in array.shape[-2:]:  # resizing would divide by the zero side
            raise ValueError(f"an image of {array.shape[-2]}x{array.shape[-1]} pixels has nothing to preprocess.")
        return array

    def center_crop(self, image: np.ndarray, size: SizeDict | dict[str, int], *args: Any, **kwargs: Any) -> np.ndarray:
        """Centre crop with OpenAI's offsets (`round`, not floor); pads with zeros when the image is smaller."""
        height, width = _height_width(size)
        image = _pad_to(image, height, width)
        top = round((image.shape[1] - height) / 2)
        left = round((image.shape[2] - width) / 2)
        return image[:, top : top + height, left : left + width]

    def rescale(self, image: np.ndarray, scale: float, *args: Any, **kwargs: Any) -> np.ndarray:
        # float32 division, as torchvision's ToTensor (`float().div(255)`): identical bits for 8-bit input.
        return image.astype(np.float32) / np.float32(1 / scale)

    def normalize(self, image: np.ndarray, mean: Any, std: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        # float32 subtract then divide, as torchvision's Normalize.
        mean_array = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        std_array = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        return (image.astype(np.float32) - mean_array) / std_array

    def preprocess_for_training(self, images: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """The paper's augmentation: resize as for evaluation, then a random `crop_size` crop (not the centre).

        Crop offsets come from `generator` (two draws per image, in order), so a given generator state gives the
        same batch. Returns float32 `(batch, 3, crop height, crop width)`, rescaled and normalised like `__call__`.
        """
        prepared = self._prepare_image_like_inputs(images, do_convert_rgb=self.do_convert_rgb)
        size = cast(SizeDict, self.size)  # a SizeDict once the processor is instantiated
        height, width = _height_width(self.crop_size)
        batch = []
        for image in prepared:
            if self.do_resize:
                image = self.resize(image, size=size, resample=self.resample)
            image = _pad_to(image, height, width)
            top = int(torch.randint(image.shape[1] - height + 1, (1,), generator=generator))
            left = int(torch.randint(image.shape[2] - width + 1, (1,), generator=generator))
            image = image[:, top : top + height, left : left + width]
            if self.do_rescale:
                image = self.rescale(image, self.rescale_factor)
            if self.do_normalize:
                image = self.normalize(image, self.image_mean, self.image_std)
            batch.append(np.ascontiguousarray(image, dtype=np.float32))
        return torch.from_numpy(np.stack(batch))


def _height_width(size: SizeDict | dict[str, int]) -> tuple[int, int]:
    height, width = (
        (size.height, size.width) if isinstance(size, SizeDict) else (size.get("height"), size.get("width"))
    )
    if height is None or width is None:
        raise ValueError(f"crop_size needs 'height' and 'width', got {size}.")
    return height, width


def _pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zero-pad a (C, H, W) image to at least `height` × `width`, split as torchvision's `center_crop` splits it."""
    pad_height = max(height - image.shape[-2], 0)
    pad_width = max(width - image.shape[-1], 0)
    if pad_height == 0 and pad_width == 0:
        return image
    padding = ((0, 0), (pad_height // 2, (pad_height + 1) // 2), (pad_width // 2, (pad_width + 1) // 2))
    return np.pad(image, padding)


__all__ = ["HfClipImageProcessor"]
