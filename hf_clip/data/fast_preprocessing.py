"""A fast path for `HfClipImageProcessor`: the same float32 pixels, bit for bit, at a fraction of the CPU time.

The processor goes through transformers' generic backend: PIL image → NumPy → back to PIL for the resize → NumPy
again, float32 rescale and normalise as separate full-image passes, plus per-call argument handling. For the
default pipeline (resize shortest side, centre crop, rescale, normalise) the same result needs only:

1. decode (PIL, full resolution: JPEG draft decoding would change the pixels) and the processor's input policy,
   skipped when it is the identity (upright RGB without transparency: EXIF transpose and `convert("RGB")` would
   only copy);
2. one PIL bicubic resize to the processor's output size (the same call on the same pixels);
3. the crop as a NumPy view, and rescale + normalise as a lookup table: an 8-bit channel value has 256 possible
   results, so the table is computed once by the processor's own `rescale` and `normalize` on a 0..255 ramp, and
   gathering from it gives exactly the values the per-image float arithmetic gives.
"""

import os
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import PIL.Image
import torch
from PIL import ExifTags, ImageOps

from ..image_processing_hf_clip import HfClipImageProcessor, decoded, load_image_bytes, to_rgb

ImageSource = PIL.Image.Image | bytes | bytearray | str | os.PathLike


def _size_field(size: Any, key: str) -> int | None:
    return getattr(size, key, None) if not isinstance(size, dict) else size.get(key)


def default_pipeline_geometry(processor: HfClipImageProcessor) -> tuple[int, int, int]:
    """`(shortest_edge, crop_height, crop_width)` of a processor running the default pipeline (resize the shortest
    side, crop, rescale, normalise); raises for any other configuration, which the fast paths do not implement."""
    flags = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")
    if not all(getattr(processor, flag) for flag in flags) or getattr(processor, "do_pad", False):
        raise ValueError(f"the fast paths implement the default pipeline only ({', '.join(flags)} all on).")
    shortest_edge = _size_field(processor.size, "shortest_edge")
    height, width = _size_field(processor.crop_size, "height"), _size_field(processor.crop_size, "width")
    if shortest_edge is None or height is None or width is None:
        raise ValueError("the fast paths need size={'shortest_edge': n} and crop_size={'height', 'width'}.")
    if max(height, width) > shortest_edge:
        raise ValueError(f"crop {height}x{width} larger than the resized shortest edge {shortest_edge}.")
    return shortest_edge, height, width


def resized_size(shortest_edge: int, height: int, width: int) -> tuple[int, int]:
    """`(height, width)` after resizing the shortest side to `shortest_edge`; the long side is truncated, as
    transformers sizes it."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)


def random_crop_offsets(
    height: int, width: int, crop_height: int, crop_width: int, generator: torch.Generator | None
) -> tuple[int, int]:
    """`(top, left)` of a random crop of a resized image: two draws, top first, as
    `HfClipImageProcessor.preprocess_for_training` makes them (so every path crops the same pixels)."""
    top = int(torch.randint(height - crop_height + 1, (1,), generator=generator))
    left = int(torch.randint(width - crop_width + 1, (1,), generator=generator))
    return top, left


class FastClipImagePreprocessor:
    """Evaluation (`__call__`) and training (`preprocess_for_training`) preprocessing equal to `processor`'s.

    Takes PIL images, encoded bytes or file paths; returns float32 `(batch, 3, crop height, crop width)` tensors.
    """

    def __init__(self, processor: HfClipImageProcessor):
        self.processor = processor
        self.shortest_edge, self.crop_height, self.crop_width = default_pipeline_geometry(processor)
        self.resample = PIL.Image.Resampling(int(processor.resample))
        # The processor's own float32 arithmetic on every 8-bit value, per channel: (3, 256).
        ramp = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))
        table = processor.normalize(
            processor.rescale(ramp, processor.rescale_factor), processor.image_mean, processor.image_std
        )
        self.table = np.ascontiguousarray(table[:, 0, :], dtype=np.float32)

    def rgb_image(self, image: ImageSource) -> PIL.Image.Image:
        """Decoded, upright RGB image under the processor's input policy."""
        if isinstance(image, (bytes, bytearray, str, os.PathLike)):
            image = load_image_bytes(image, name=image if isinstance(image, str) else "image bytes")
        elif isinstance(image, PIL.Image.Image):
            image = decoded(image)
        else:
            raise TypeError(f"expected a PIL image, encoded bytes or a file path, got {type(image).__name__}.")
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode != "RGB" or "transparency" in image.info:
            image = to_rgb(image)
        return image

    def resized(self, image: PIL.Image.Image) -> np.ndarray:
        """Shortest side to `shortest_edge` (the long side truncated, as transformers sizes it), as (H, W, 3)."""
        height, width = resized_size(self.shortest_edge, image.height, image.width)
        return np.asarray(image.resize((width, height), resample=self.resample))

    def normalized(self, crop: np.ndarray, out: np.ndarray) -> None:
        """Rescale and normalise an (H, W, 3) uint8 crop into `out` (3, H, W) by table lookup."""
        for channel in range(3):
            np.take(self.table[channel], crop[..., channel], out=out[channel])

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> torch.Tensor:
        """Resize, centre crop (offsets rounded as OpenAI's), rescale and normalise: `processor(images)` exactly."""
        images = [images] if isinstance(images, (PIL.Image.Image, bytes, bytearray, str, os.PathLike)) else images
        batch = torch.empty(len(images), 3, self.crop_height, self.crop_width, dtype=torch.float32)
        out = batch.numpy()
        for index, image in enumerate(images):
            pixels = self.resized(self.rgb_image(image))
            top = round((pixels.shape[0] - self.crop_height) / 2)
            left = round((pixels.shape[1] - self.crop_width) / 2)
            self.normalized(pixels[top : top + self.crop_height, left : left + self.crop_width], out[index])
        return batch

    def preprocess_for_training(
        self, images: ImageSource | Sequence[ImageSource], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`processor.preprocess_for_training` exactly: the same random square crops for the same generator state."""
        images = [images] if isinstance(images, (PIL.Image.Image, bytes, bytearray, str, os.PathLike)) else images
        batch = torch.empty(len(images), 3, self.crop_height, self.crop_width, dtype=torch.float32)
        out = batch.numpy()
        for index, image in enumerate(cast(Sequence[ImageSource], images)):
            pixels = self.resized(self.rgb_image(image))
            top, left = random_crop_offsets(
                pixels.shape[0], pixels.shape[1], self.crop_height, self.crop_width, generator
            )
            self.normalized(pixels[top : top + self.crop_height, left : left + self.crop_width], out[index])
        return batch
