"""Run in a fresh interpreter by `conversion.load_check`: load a saved folder the way a user would and record outputs.

    python -I load_check_worker.py MODE FOLDER WORKDIR

MODE is `hf_clip` (hf_clip installed, Auto classes), `transformers` (hf_clip made unimportable, stock
`transformers.CLIPModel`) or `remote_code` (hf_clip unimportable, `trust_remote_code=True` through `AutoModel`,
`AutoModelForZeroShotImageClassification`, `AutoProcessor` and the zero-shot pipeline). WORKDIR holds
`inputs.safetensors` (and `image.png`, `labels.json` for the pipeline); the worker writes
`outputs_<loader>.safetensors`, `pipeline.json` and `report.json` there. This file imports neither hf_clip nor
`conversion`, so it can run where neither is importable.
"""

import importlib.abc
import json
import sys
from pathlib import Path
from typing import Any

BLOCKED_PACKAGE = "hf_clip"


class _BlockPackage(importlib.abc.MetaPathFinder):
    """Makes `import hf_clip` fail as it would where hf_clip is not installed (editable installs included)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == BLOCKED_PACKAGE or fullname.startswith(BLOCKED_PACKAGE + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def _block_hf_clip() -> None:
    sys.meta_path.insert(0, _BlockPackage())
    try:
        import hf_clip  # noqa: F401
    except ModuleNotFoundError:
        return
    raise RuntimeError("hf_clip is still importable; the clean-environment check would prove nothing.")


def _outputs(model, inputs):
    import torch

    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        logits = model(**inputs).logits_per_image
    return {"image_features": image, "text_features": text, "logits_per_image": logits}


def main(mode: str, folder: str, workdir: str) -> None:
    if mode not in ("hf_clip", "transformers", "remote_code"):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "hf_clip":
        import hf_clip  # noqa: F401  (registers the Auto classes)
    else:
        _block_hf_clip()

    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor, CLIPModel, pipeline

    work = Path(workdir)
    inputs = load_file(work / "inputs.safetensors")
    remote = mode == "remote_code"
    loaders: dict[str, Any]
    if mode == "transformers":
        loaders = {"CLIPModel": CLIPModel, "AutoModel": AutoModel}
    else:
        loaders = {
            "AutoModel": AutoModel,
            "AutoModelForZeroShotImageClassification": AutoModelForZeroShotImageClassification,
        }
    report: dict = {"mode": mode, "classes": {}}
    for name, loader in loaders.items():
        model = loader.from_pretrained(folder, trust_remote_code=remote).eval()
        report["classes"][name] = type(model).__module__ + "." + type(model).__name__
        save_file(
            {k: v.contiguous() for k, v in _outputs(model, inputs).items()}, work / f"outputs_{name}.safetensors"
        )

    if (Path(folder) / "preprocessor_config.json").is_file() or (Path(folder) / "processor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote)
        report["classes"]["AutoProcessor"] = type(processor).__name__
        report["classes"]["tokenizer"] = type(processor.tokenizer).__name__
        report["classes"]["image_processor"] = type(processor.image_processor).__name__
        report["vocab_size"] = len(processor.tokenizer)
        if (work / "labels.json").is_file():
            from PIL import Image

            classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=remote)
            labels = json.loads((work / "labels.json").read_text())
            scores = classifier(Image.open(work / "image.png"), candidate_labels=labels)
            (work / "pipeline.json").write_text(json.dumps(scores))
            report["classes"]["pipeline_model"] = type(classifier.model).__name__
    (work / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
