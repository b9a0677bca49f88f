"""The batch format of `image_decoding="device"`, written and read in this one module: the data workers check each
JPEG and draw its crop (`DeviceJpegs`, whose `collate` writes the batch), the training device decodes and crops them
(`device_images`, with `hf_clip.data.device_decoding.DeviceImagePreprocessor`).
"""

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from PIL import ExifTags

from ..image_processing_hf_clip import HfClipImageProcessor, decoded
from .fast_preprocessing import default_pipeline_geometry, random_crop_offsets, resized_size

if TYPE_CHECKING:  # importing it needs torchvision, which only `image_decoding="device"` requires
    from .device_decoding import DeviceImagePreprocessor


@dataclass
class DeviceJpeg:
    """A training image the device decodes: the JPEG file, its EXIF orientation and the crop drawn for it."""

    data: bytes
    orientation: int
    top: int
    left: int


class DeviceJpegs:
    """The worker side of `image_decoding="device"`: JPEGs are checked and cropped here, decoded on the device.

    `__call__` takes the encoded image of one sample. An RGB or grayscale JPEG is decoded at 1/8 scale (PIL's draft
    mode: the entropy decoding of the whole stream still runs, so a truncated or corrupt file fails here as it would
    on the CPU path, at a fraction of a full decode's cost), and its crop offsets are drawn from the sample's
    generator exactly as the CPU path draws them; everything else (PNG, CMYK JPEGs, ...) returns `None` and takes
    the CPU path in the worker.

    `collate` writes a batch whose samples come in their stream order from both paths:

    - `decoded_on_device`: bool `(batch,)`, which rows the device decodes;
    - `jpeg_data`: uint8, those rows' JPEG files concatenated, split by `jpeg_lengths` (int64, one per such row);
    - `jpeg_orientations`: int64, their EXIF orientations (1-8); `jpeg_crop_offsets`: int64 `(rows, 2)`, the
      `(top, left)` of each crop in the resized upright image;
    - `cpu_pixel_values`: float32 `(other rows, 3, height, width)`, the other rows, preprocessed in the worker.

    `device_images` turns it into `pixel_values` on the device.
    """

    def __init__(self, processor: HfClipImageProcessor):
        self.shortest_edge, self.crop_height, self.crop_width = default_pipeline_geometry(processor)

    def __call__(self, data: bytes | bytearray, name: str, generator: torch.Generator) -> DeviceJpeg | None:
        if data[:3] != b"\xff\xd8\xff":  # not a JPEG: the CPU path decodes it (and names the problem if it can't)
            return None
        try:
            image = PIL.Image.open(io.BytesIO(data))
        except PIL.UnidentifiedImageError as error:
            raise ValueError(f"{name} is not an image in a format PIL can read ({error}).") from error
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        width, height = image.size
        orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
        if orientation in (5, 6, 7, 8):  # transposed: the upright image is height × width
            width, height = height, width
        image.draft("L", (1, 1))  # luma only, 1/8 scale
        decoded(image, name)
        top, left = random_crop_offsets(
            *resized_size(self.shortest_edge, height, width), self.crop_height, self.crop_width, generator
        )
        return DeviceJpeg(bytes(data), orientation, top, left)

    def collate(self, images: list[torch.Tensor | DeviceJpeg]) -> dict[str, torch.Tensor]:
        jpegs = [image for image in images if isinstance(image, DeviceJpeg)]
        pixels = [image for image in images if isinstance(image, torch.Tensor)]
        offsets = torch.tensor([(jpeg.top, jpeg.left) for jpeg in jpegs], dtype=torch.int64)
        return {
            "decoded_on_device": torch.tensor([isinstance(image, DeviceJpeg) for image in images]),
            "jpeg_data": torch.from_numpy(np.frombuffer(b"".join(jpeg.data for jpeg in jpegs), np.uint8).copy()),
            "jpeg_lengths": torch.tensor([len(jpeg.data) for jpeg in jpegs], dtype=torch.int64),
            "jpeg_orientations": torch.tensor([jpeg.orientation for jpeg in jpegs], dtype=torch.int64),
            "jpeg_crop_offsets": offsets.view(-1, 2),  # (0, 2) when every row is decoded in the worker
            "cpu_pixel_values": (
                torch.stack(pixels) if pixels else torch.empty(0, 3, self.crop_height, self.crop_width)
            ),
        }


def device_images(
    batch: dict[str, torch.Tensor], device: torch.device, decoder: "DeviceImagePreprocessor | None" = None
) -> dict[str, torch.Tensor]:
    """`pixel_values` on the device: the workers' pixels, or (`image_decoding="device"`) the batch's JPEGs decoded
    and cropped by `decoder` merged in stream order with the rows the workers decoded (format:
    `DeviceJpegs`)."""
    if "pixel_values" in batch:
        return {"pixel_values": batch["pixel_values"].to(device, non_blocking=True)}
    if decoder is None:
        raise ValueError(
            "this batch carries JPEG files (image_decoding='device'): pass the DeviceImagePreprocessor to decode them."
        )
    on_device = batch["decoded_on_device"]
    pixel_values = torch.empty(len(on_device), 3, decoder.crop_height, decoder.crop_width, device=device)
    # The loader's tensors are on the host: these row, length and offset reads cost no device synchronisation.
    jpeg_rows, worker_rows = on_device.nonzero()[:, 0], (~on_device).nonzero()[:, 0]
    if len(jpeg_rows):
        jpegs = torch.split(batch["jpeg_data"], batch["jpeg_lengths"].tolist())
        crops = decoder.random_crops(jpegs, batch["jpeg_orientations"].tolist(), batch["jpeg_crop_offsets"].tolist())
        pixel_values.index_copy_(0, jpeg_rows.to(device, non_blocking=True), crops)
    if len(worker_rows):
        worker_pixels = batch["cpu_pixel_values"].to(device, non_blocking=True)
        pixel_values.index_copy_(0, worker_rows.to(device, non_blocking=True), worker_pixels)
    return {"pixel_values": pixel_values}
