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

In training (`TrainConfig.image_decoding="device"`) the data workers check each JPEG, draw its crop offsets and ship
the bytes (`hf_clip.data.device_jpegs.DeviceJpegs`); `random_crops` decodes and crops them on the device.
`examples/benchmarks/device_decoding.py` measures the difference from the exact path and the GPU rate.
"""

import io
from collections.abc import Sequence

import PIL.Image
import torch
from PIL import ExifTags
from torch.nn import functional as F

try:
    import torchvision
    from torchvision.io import ImageReadMode
except ImportError as error:  # an optional dependency: only device decoding needs it
    raise ImportError("device JPEG decoding needs torchvision: `pip install torchvision`.") from error

from ..image_processing_hf_clip import HfClipImageProcessor
from .fast_preprocessing import default_pipeline_geometry, random_crop_offsets, resized_size


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

    `__call__` takes centre crops, `preprocess_for_training` the paper's random crops, `random_crops` crops at
    offsets drawn elsewhere (by the training data workers). Sizes and crop offsets follow the exact path (long side
    `int(edge * long / short)`, centre offset rounded, random offsets drawn per image as
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
        images = self.decode(_tensors(jpegs), [exif_orientation(jpeg) for jpeg in jpegs])
        offsets = []
        for image in images:
            height, width = resized_size(self.shortest_edge, *image.shape[-2:])
            offsets.append((round((height - self.crop_height) / 2), round((width - self.crop_width) / 2)))
        return self._crops(images, offsets)

    def preprocess_for_training(self, jpegs: Sequence[bytes], generator: torch.Generator) -> torch.Tensor:
        images = self.decode(_tensors(jpegs), [exif_orientation(jpeg) for jpeg in jpegs])
        offsets = [
            random_crop_offsets(
                *resized_size(self.shortest_edge, *image.shape[-2:]), self.crop_height, self.crop_width, generator
            )
            for image in images
        ]
        return self._crops(images, offsets)

    def random_crops(
        self, jpegs: Sequence[torch.Tensor], orientations: Sequence[int], offsets: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Training crops of JPEGs given as 1-D uint8 CPU tensors, with their EXIF orientations and the `(top, left)`
        offsets already drawn in the resized upright image (`hf_clip.data.device_jpegs.DeviceJpegs` draws them)."""
        return self._crops(self.decode(jpegs, orientations), offsets)

    def decode(self, jpegs: Sequence[torch.Tensor], orientations: Sequence[int]) -> list[torch.Tensor]:
        """Upright uint8 `(3, H, W)` images on the device (nvJPEG on CUDA, libjpeg-turbo on CPU)."""
        try:
            # nvJPEG ignores `apply_exif_orientation`, so the orientation is applied in torch below.
            decoded = torchvision.io.decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            # nvJPEG refuses some streams libjpeg-turbo reads (the data workers checked each file with PIL, which
            # uses libjpeg-turbo): those are decoded on the host. Only this failure path pays the extra work.
            decoded = [self._decode_one(jpeg) for jpeg in jpegs]
        return [upright(image, orientation) for image, orientation in zip(decoded, orientations, strict=True)]

    def _decode_one(self, jpeg: torch.Tensor) -> torch.Tensor:
        try:
            return torchvision.io.decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return torchvision.io.decode_jpeg(jpeg, mode=ImageReadMode.RGB).to(self.device)

    def _crops(self, images: Sequence[torch.Tensor], offsets: Sequence[Sequence[int]]) -> torch.Tensor:
        crop_height, crop_width = self.crop_height, self.crop_width
        batch = torch.empty(len(images), 3, crop_height, crop_width, device=self.device)
        for index, (image, (top, left)) in enumerate(zip(images, offsets, strict=True)):
            new_size = resized_size(self.shortest_edge, *image.shape[-2:])
            if not (0 <= top <= new_size[0] - crop_height and 0 <= left <= new_size[1] - crop_width):
                raise ValueError(f"crop offset {(top, left)} outside the resized {new_size[0]}x{new_size[1]} image.")
            resized = F.interpolate(
                image[None].float(), size=new_size, mode="bicubic", antialias=True, align_corners=False
            )
            crop = resized[0, :, top : top + crop_height, left : left + crop_width].round_().clamp_(0, 255)
            batch[index] = (crop / (1 / self.rescale_factor) - self.mean) / self.std
        return batch


def _tensors(jpegs: Sequence[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
