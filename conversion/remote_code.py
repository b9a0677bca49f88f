"""Save an hf_clip checkpoint together with its code, so `trust_remote_code=True` loads it without hf_clip.

`register_for_auto_class` makes `save_pretrained` copy each class's module (and the sibling modules it imports
relatively) into the folder and record it in `auto_map`. One auto class is recorded per class, so
`AutoModelForZeroShotImageClassification` (the pipeline's loader) is pre-seeded into `config.auto_map` by hand.
Registration mutates class attributes and the config's `auto_map`; both are restored on exit, because re-saving a
model that still carries `auto_map` without registration writes a repository that names code it does not contain.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers import PreTrainedModel

MODEL_AUTO_CLASS = "AutoModel"
EXTRA_MODEL_AUTO_CLASSES = ("AutoModelForZeroShotImageClassification",)
PROCESSOR_AUTO_CLASSES = {"tokenizer": "AutoTokenizer", "image_processor": "AutoImageProcessor"}


def _class_reference(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


@contextmanager
def remote_code_registration(model: PreTrainedModel, processor: Any | None = None) -> Iterator[None]:
    """Within the block, `model.save_pretrained` / `processor.save_pretrained` write code and `auto_map`."""
    registrations: list[tuple[Any, str]] = [(type(model.config), "AutoConfig"), (type(model), MODEL_AUTO_CLASS)]
    if processor is not None:
        registrations += [
            (type(getattr(processor, attribute)), auto_class)
            for attribute, auto_class in PROCESSOR_AUTO_CLASSES.items()
        ]
        registrations.append((type(processor), "AutoProcessor"))
    previous_classes = [(cls, cls.__dict__.get("_auto_class")) for cls, _ in registrations]
    had_auto_map = "auto_map" in vars(model.config)
    previous_auto_map = vars(model.config).get("auto_map")
    try:
        for cls, auto_class in registrations:
            cls.register_for_auto_class(auto_class)
        model.config.auto_map = {name: _class_reference(model) for name in EXTRA_MODEL_AUTO_CLASSES}
        yield
    finally:
        for cls, previous in previous_classes:
            if previous is None:
                # Back to the inherited default (None on transformers' base classes).
                if "_auto_class" in cls.__dict__:
                    delattr(cls, "_auto_class")
            else:
                cls._auto_class = previous
        if had_auto_map:
            model.config.auto_map = previous_auto_map
        elif "auto_map" in vars(model.config):
            del model.config.auto_map
