"""A loader batch (CPU tensors from the data workers) made ready for the training step on the device.

Images and text are prepared by separate functions, so the image path (decoding, memory format) and the text path
(layout of the token batch) can change independently; `device_batch` composes them.
"""

from typing import TYPE_CHECKING

import torch

from .device_jpegs import device_images
from .text_batching import pack_text

if TYPE_CHECKING:  # importing it needs torchvision, which only `image_decoding="device"` requires
    from .device_decoding import DeviceImagePreprocessor


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
