"""HfClipProcessor: the CLIP tokenizer and image processor behind one call."""

import logging
from typing import Any

from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs

from .tokenization_hf_clip import OverflowPolicy, check_overflow, overlong_captions

logger = logging.getLogger(__name__)


class HfClipProcessorKwargs(ProcessingKwargs, total=False):
    # Lowest-priority defaults of ProcessorMixin's kwargs merging: call arguments and tokenizer settings win. Set
    # here, transformers' documented place on every 5.x release we support (class attributes of the processor are
    # read only by later releases).
    _defaults = {"text_kwargs": {"padding": True, "truncation": True}}  # type: ignore[misc]  # a TypedDict class


class HfClipProcessor(ProcessorMixin):
    """`processor(text=..., images=...)` → `input_ids`, `attention_mask` and `pixel_values` for `HfClipModel`.

    Text is padded to the longest caption of the batch and truncated to the tokenizer's `model_max_length` (the
    model's text context: 77, or the stretched length of `HfClipModel.stretch_text_positions`) with the end-of-text
    token kept last, so every batch is valid model input; pass `padding=...` or `truncation=...` to change either.
    Truncation is never silent: `on_overflow="truncate"` (the default) cuts over-long captions and logs how many,
    `on_overflow="error"` refuses them with a ValueError naming them. Images follow `HfClipImageProcessor`
    (OpenAI's preprocessing).
    """

    valid_processor_kwargs = HfClipProcessorKwargs

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self, images: Any = None, text: Any = None, *, on_overflow: OverflowPolicy = "truncate", **kwargs: Any
    ) -> BatchFeature:
        # Left to transformers, an empty text list fails deep in the tokenizer and an empty image list gives a
        # pixel_values tensor no model accepts.
        for name, inputs in (("text", text), ("images", images)):
            if isinstance(inputs, list | tuple) and not inputs:
                raise ValueError(f"HfClipProcessor got an empty list of {name}; pass at least one or leave it out.")
        check_overflow({}, 0, on_overflow)  # a valid policy, before any work
        outputs = super().__call__(images=images, text=text, **kwargs)
        if text is not None and kwargs.get("truncation", True) not in (False, "do_not_truncate"):
            texts = [text] if isinstance(text, str) else list(text)
            max_length = kwargs.get("max_length") or self.tokenizer.model_max_length
            overlong = overlong_captions(self.tokenizer, texts, outputs.get("attention_mask"), max_length)
            truncated = check_overflow(overlong, max_length, on_overflow)
            if truncated:
                logger.warning(
                    "%d of %d captions were longer than %d tokens and were truncated (on_overflow='error' refuses "
                    "them).",
                    truncated,
                    len(texts),
                    max_length,
                )
        return outputs


__all__ = ["HfClipProcessor"]
