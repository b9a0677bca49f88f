"""Training-time JPEG decoding and CLIP preprocessing on the GPU (optional; needs torchvision).

A 16-core host cannot feed ViT-B/32 training on one H100 with CPU decoding and the exact preprocessing
(`examples/benchmarks/RESULTS.md`), so for training the JPEG bytes can go to the device:
`torchvision.io.decode_jpeg(device="cuda")` (nvJPEG; the EXIF orientation, which nvJPEG ignores, is read from the
header and applied in torch), then an antialiased bicubic resize of the shortest side, a crop (centre, or random for
the paper's augmentation), rescale and normalise, all in torch, with the sizes, mean and std of the
`HfClipImageProcessor` it is built from. This is close to, not equal to, the exact path: torch's antialiased bicubic
keeps the horizontal pass in float where PIL rounds it to 8 bits, uses float instead of fixed-point weights, and
nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's. Evaluation stays on the exact path
(`HfClipImageProcessor` or `hf_clip.data.fast_preprocessing.FastClipImagePreprocessor`).

`examples/benchmarks/device_decoding.py` measures the difference from the exact path and the GPU rate.
"""

import io
from collections.abc import Sequence

import PIL.Image
import torch
import torchvision
from PIL import ExifTags
from torch.nn import functional as F
from torchvision.io import ImageReadMode

from ..image_processing_hf_clip import HfClipImageProcessor
from .fast_preprocessing import default_pipeline_geometry


def exif_orientation(jpeg: bytes) -> int:
    """The EXIF orientation tag (1 = upright) from the header, without decoding the pixels."""
    with PIL.Image.open(io.BytesIO(jpeg)) as image:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) tensor as `PIL.ImageOps.exif_transpose` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, dims=(-2, -1))
    return image


class DeviceImagePreprocessor:
    """JPEG bytes → float32 `(batch, 3, crop height, crop width)` on `device`, configured by an image processor.

    `__call__` takes centre crops, `preprocess_for_training` the paper's random crops. Sizes and crop offsets follow
    the exact path (long side `int(edge * long / short)`, centre offset rounded, random offsets drawn per image as
    `HfClipImageProcessor.preprocess_for_training` draws them); the resized image is rounded to 8-bit levels as
    PIL's output is, so the remaining difference is the resampling arithmetic and the decoder.
    """

    def __init__(self, processor: HfClipImageProcessor, device: torch.device | str):
        self.shortest_edge, self.crop_height, self.crop_width = default_pipeline_geometry(processor)
        if PIL.Image.Resampling(int(processor.resample)) != PIL.Image.Resampling.BICUBIC:
            raise ValueError(f"device decoding resizes bicubic only; the processor uses {processor.resample}.")
        self.device = torch.device(device)
        self.rescale_factor = float(processor.rescale_factor)
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32, device=self.device).view(3, 1, 1)

    def __call__(self, jpegs: Sequence[bytes]) -> torch.Tensor:
        return self._preprocess(jpegs, generator=None)

    def preprocess_for_training(self, jpegs: Sequence[bytes], generator: torch.Generator) -> torch.Tensor:
        return self._preprocess(jpegs, generator)

    def _preprocess(self, jpegs: Sequence[bytes], generator: torch.Generator | None) -> torch.Tensor:
        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        # nvJPEG ignores `apply_exif_orientation`, so the tag is read from the header here and applied in torch.
        decoded = torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        images = [upright(image, exif_orientation(jpeg)) for image, jpeg in zip(decoded, jpegs, strict=True)]
        crop_height, crop_width = self.crop_height, self.crop_width
        batch = torch.empty(len(images), 3, crop_height, crop_width, device=self.device)
        for index, image in enumerate(images):
            height, width = image.shape[-2:]
            short, long = min(height, width), max(height, width)
            new_long = int(self.shortest_edge * long / short)
            new_size = (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)
            resized = F.interpolate(
                image[None].float(), size=new_size, mode="bicubic", antialias=True, align_corners=False
            )
            resized = resized[0].round_().clamp_(0, 255)
            if generator is None:
                top, left = round((new_size[0] - crop_height) / 2), round((new_size[1] - crop_width) / 2)
            else:
                top = int(torch.randint(new_size[0] - crop_height + 1, (1,), generator=generator))
                left = int(torch.randint(new_size[1] - crop_width + 1, (1,), generator=generator))
            crop = resized[:, top : top + crop_height, left : left + crop_width]
            batch[index] = (crop / (1 / self.rescale_factor) - self.mean) / self.std
        return batch
