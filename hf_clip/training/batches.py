"""A loader batch (CPU tensors from the data workers) made ready for the training step on the device.

Images and text are prepared by separate functions, so the image path (decoding, memory format) and the text path
(layout of the token batch) can change independently; `device_batch` composes them.
"""

import torch


def device_images(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`pixel_values` on the device."""
    return {"pixel_values": batch["pixel_values"].to(device, non_blocking=True)}


def device_text(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The token batch on the device."""
    return {name: batch[name].to(device, non_blocking=True) for name in ("input_ids", "attention_mask")}


def device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {**device_images(batch, device), **device_text(batch, device)}
