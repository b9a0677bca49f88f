"""CLIP training with Accelerate: the run config, the data position and checkpoints, the paper's optimizer and
accumulation modes, fine-tuning controls (locked towers, layer-wise learning-rate decay), zero-shot monitoring, and
the loop (`hf_clip.training.loop.main`, the `hf-clip-train` console script and `accelerate launch
examples/train.py`).

Importing this package imports accelerate and datasets (the `train` extra); `import hf_clip` does not.
"""

from .config import TrainConfig, parse_config
from .finetuning import layer_decay_scales, layer_groups, lock_logit_parameters, lock_tower
from .loop import main
from .objective import ClipObjective, ObjectiveOutput
from .steps import ClipEmbedder, build_optimizer, cached_accumulation_backward, clamp_logit_scale_

__all__ = [
    "ClipEmbedder",
    "ClipObjective",
    "ObjectiveOutput",
    "TrainConfig",
    "build_optimizer",
    "cached_accumulation_backward",
    "clamp_logit_scale_",
    "layer_decay_scales",
    "layer_groups",
    "lock_logit_parameters",
    "lock_tower",
    "main",
    "parse_config",
]
