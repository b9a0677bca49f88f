"""Check a saved folder in a fresh interpreter: it loads the way a user loads it and reproduces the model's outputs.

Modes: `hf_clip` (hf_clip installed; Auto classes), `transformers` (hf_clip unimportable; stock `CLIPModel`) and
`remote_code` (hf_clip unimportable; `trust_remote_code=True` through `AutoModel`,
`AutoModelForZeroShotImageClassification`, `AutoProcessor` and the zero-shot pipeline). Each loaded model must give
the in-memory model's image features, text features and logits at fp32 atol=1e-5, and the pipeline the same scores
as the stock pipeline run on the in-memory model and processor.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from hf_clip import HfClipConfig

from .checks import ParityInputs, assert_parity, clip_model_outputs, parity_inputs

WORKER = Path(__file__).resolve().parent / "load_check_worker.py"
MODES = ("hf_clip", "transformers", "remote_code")
PIPELINE_LABELS = ("cat", "dog", "car")
# Subprocess start, imports and loading; generous for a shared CPU.
TIMEOUT_S = 600


class FolderCheckError(RuntimeError):
    """A saved folder does not load in a clean process, or loads into a model with different outputs."""


def _pipeline_scores(model: Any, processor: Any, image: Image.Image) -> list[dict[str, Any]]:
    from transformers import pipeline

    classifier = pipeline(
        "zero-shot-image-classification",
        model=model,
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    return classifier(image, candidate_labels=list(PIPELINE_LABELS))


def check_folder_loads(
    folder: str | Path,
    model: PreTrainedModel,
    mode: str = "hf_clip",
    processor: Any = None,
    inputs: ParityInputs | None = None,
) -> dict[str, Any]:
    """Load `folder` in a fresh `python -I` process in `mode` and compare with `model` (and `processor`).

    Returns the worker's report (the classes it loaded) with the measured max differences per loader.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    inputs = inputs or parity_inputs(cast(HfClipConfig, model.config))
    expected = clip_model_outputs(model.eval(), inputs)
    with tempfile.TemporaryDirectory(prefix="hf_clip_load_check_") as workdir:
        work = Path(workdir)
        save_file(
            {name: tensor.contiguous() for name, tensor in inputs.as_dict().items()}, work / "inputs.safetensors"
        )
        expected_scores = None
        if processor is not None:
            pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            image.save(work / "image.png")
            (work / "labels.json").write_text(json.dumps(list(PIPELINE_LABELS)))
            expected_scores = _pipeline_scores(model, processor, image)
        environment = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": str(work / "modules"),  # remote code is copied here, not into the user's cache
            "TOKENIZERS_PARALLELISM": "false",
        }
        result = subprocess.run(
            [sys.executable, "-I", str(WORKER), mode, str(Path(folder).resolve()), str(work)],
            capture_output=True,
            text=True,
            env=environment,
            timeout=TIMEOUT_S,
        )
        if result.returncode != 0:
            raise FolderCheckError(f"{folder} does not load in a clean process ({mode}):\n{result.stderr[-4000:]}")
        report = json.loads((work / "report.json").read_text())
        report["max_differences"] = {}
        for loader in report["classes"]:
            outputs_path = work / f"outputs_{loader}.safetensors"
            if outputs_path.is_file():
                got = load_file(outputs_path)
                report["max_differences"][loader] = assert_parity(expected, got, f"{folder} via {loader} ({mode})")
        if expected_scores is not None:
            scores = json.loads((work / "pipeline.json").read_text())
            _compare_scores(expected_scores, scores, f"{folder} pipeline ({mode})")
            report["pipeline_scores"] = scores
    return report


def _compare_scores(expected: list[dict[str, Any]], got: list[dict[str, Any]], what: str) -> None:
    expected_by_label = {item["label"]: item["score"] for item in expected}
    got_by_label = {item["label"]: item["score"] for item in got}
    if expected_by_label.keys() != got_by_label.keys():
        raise FolderCheckError(f"{what}: labels {sorted(got_by_label)} != {sorted(expected_by_label)}")
    worst = max(abs(expected_by_label[label] - got_by_label[label]) for label in expected_by_label)
    if not worst <= 1e-5:
        raise FolderCheckError(f"{what}: pipeline scores differ by up to {worst:.3e}")
