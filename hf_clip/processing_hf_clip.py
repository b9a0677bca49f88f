"""HfClipProcessor: the CLIP tokenizer and image processor behind one call."""

from typing import Any

from transformers import ProcessorMixin, TextKwargs


class HfClipProcessor(ProcessorMixin):
    """`processor(text=..., images=...)` → `input_ids`, `attention_mask` and `pixel_values` for `HfClipModel`.

    Text is padded to the longest caption of the batch and truncated to the tokenizer's `model_max_length` (77)
    with the end-of-text token kept last, so every batch is valid model input; pass `padding=...` or
    `truncation=...` to change either. Images follow `HfClipImageProcessor` (OpenAI's preprocessing).
    """

    # Lowest-priority defaults of ProcessorMixin's kwargs merging: call arguments and tokenizer settings win.
    text_kwargs = TextKwargs(padding=True, truncation=True)

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)


__all__ = ["HfClipProcessor"]
