"""CLIP evaluation: zero-shot classification (single template and ensembles), image↔text retrieval and the paper's
linear probe, over local data read with `datasets` (`hf_clip.evaluation.runner.main`, the `hf-clip-eval` console
script and `accelerate launch examples/zero_shot_eval.py`).

Importing this package imports accelerate, datasets and evaluate (the `eval` extra); `import hf_clip` does not.
"""

from .metrics import linear_probe, mean_per_class_recall, retrieval_recall_at_k, top_k_accuracy
from .runner import EvalConfig, evaluate_model, main

__all__ = [
    "EvalConfig",
    "evaluate_model",
    "linear_probe",
    "main",
    "mean_per_class_recall",
    "retrieval_recall_at_k",
    "top_k_accuracy",
]
