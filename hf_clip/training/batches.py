"""A loader batch (CPU tensors from the data workers) made ready for the training step on the device.

Images and text are prepared by separate functions, so the image path (decoding, memory format) and the text path
(layout of the token batch) can change independently; `device_batch` composes them.
"""

from typing import TYPE_CHECKING

import torch

from ..data.text_batching import pack_text

if TYPE_CHECKING:  # importing it needs torchvision, which only `image_decoding="device"` requires
    from ..data.device_decoding import DeviceImagePreprocessor


def device_images(
    batch: dict[str, torch.Tensor], device: torch.device, decoder: "DeviceImagePreprocessor | None" = None
) -> dict[str, torch.Tensor]:
    """`pixel_values` on the device: the workers' pixels, or (`image_decoding="device"`) the batch's JPEGs decoded
    and cropped by `decoder` merged in stream order with the rows the workers decoded (format:
    `hf_clip.data.streams.DeviceJpegs`)."""
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


def device_text(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The token batch on the device, packed without padding: `input_ids`, `position_ids` and `cu_seqlens` of
    `hf_clip.data.text_batching.pack_text`, which `ClipEmbedder` embeds at a cost that follows the sum of caption
    lengths. Packing reads the caption lengths from these CPU tensors, so the step never reads them from the
    device."""
    packed = pack_text(batch["input_ids"], batch["attention_mask"])
    return {name: tensor.to(device, non_blocking=True) for name, tensor in packed._asdict().items()}


def device_batch(
    batch: dict[str, torch.Tensor], device: torch.device, image_decoder: "DeviceImagePreprocessor | None" = None
) -> dict[str, torch.Tensor]:
    return {**device_images(batch, device, image_decoder), **device_text(batch, device)}
