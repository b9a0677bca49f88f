"""HfClipProcessor: the CLIP tokenizer and image processor behind one call."""

from typing import Any

from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs


class HfClipProcessorKwargs(ProcessingKwargs, total=False):
    # Lowest-priority defaults of ProcessorMixin's kwargs merging: call arguments and tokenizer settings win. Set
    # here, transformers' documented place on every 5.x release we support (class attributes of the processor are
    # read only by later releases).
    _defaults = {"text_kwargs": {"padding": True, "truncation": True}}  # type: ignore[misc]  # a TypedDict class


class HfClipProcessor(ProcessorMixin):
    """`processor(text=..., images=...)` → `input_ids`, `attention_mask` and `pixel_values` for `HfClipModel`.

    Text is padded to the longest caption of the batch and truncated to the tokenizer's `model_max_length` (77)
    with the end-of-text token kept last, so every batch is valid model input; pass `padding=...` or
    `truncation=...` to change either. Images follow `HfClipImageProcessor` (OpenAI's preprocessing).
    """

    valid_processor_kwargs = HfClipProcessorKwargs

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> BatchFeature:
        # Left to transformers, an empty text list fails deep in the tokenizer and an empty image list gives a
        # pixel_values tensor no model accepts.
        for name, inputs in (("text", text), ("images", images)):
            if isinstance(inputs, list | tuple) and not inputs:
                raise ValueError(f"HfClipProcessor got an empty list of {name}; pass at least one or leave it out.")
        return super().__call__(images=images, text=text, **kwargs)


__all__ = ["HfClipProcessor"]
