"""hf_clip.onnx: towers exported once and run with onnxruntime equal PyTorch's embeddings within 1e-4 (fp32) at batch
sizes 1 and 7 from the same files, padded texts included; `import hf_clip` never loads onnx.

The ViT model exports both towers, the ResNet model its image tower only: its text tower is the same module as the
ViT model's, and an export costs seconds of the suite's time."""

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import hf_clip
from hf_clip import HfClipImageProcessor, HfClipModel
from hf_clip.onnx.export import TEXT_FILE, VISION_FILE, export_onnx
from hf_clip.onnx.runtime import OnnxClipEmbedder
from hf_clip.testing_utils import TINY_RESNET, TINY_VIT, random_images, tiny_clip_tokenizer, tiny_config
from hf_clip.zero_shot import encode_images, encode_texts

ATOL = 1e-4
CAPTIONS = ["a red square", "a photo of a dog.", "blue", "two cats on a mat", "x", "a very long caption here", "ok"]


@pytest.fixture(
    scope="module", params=[(TINY_VIT, ("vision", "text")), (TINY_RESNET, ("vision",))], ids=["vit", "resnet"]
)
def exported(request, tmp_path_factory):
    vision, towers = request.param
    torch.manual_seed(0)
    model = HfClipModel(tiny_config(vision)).eval()
    size = model.config.vision_config.image_size
    image_processor = HfClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tiny_clip_tokenizer().save_pretrained(folder)
    image_processor.save_pretrained(folder)
    output = tmp_path_factory.mktemp("onnx")
    report = export_onnx(str(folder), output, towers)
    return model, image_processor, output, report


def test_export_checks_its_files_and_declares_dynamic_batch(exported):
    _, _, output, report = exported
    assert report["max_abs_difference"] and all(value <= ATOL for value in report["max_abs_difference"].values())
    for name, inputs in ((VISION_FILE, ["pixel_values"]), (TEXT_FILE, ["input_ids", "attention_mask"])):
        if name not in report["max_abs_difference"]:
            assert not (output / name).exists()
            continue
        graph = onnx.load(str(output / name)).graph
        assert [value.name for value in graph.input] == inputs
        for value in graph.input:
            batch = value.type.tensor_type.shape.dim[0]
            assert batch.dim_param and not batch.dim_value, f"{name}: {value.name} has a fixed batch dimension"


@pytest.mark.parametrize("batch_size", [1, 7])
def test_onnx_embeddings_equal_pytorch(exported, batch_size):
    model, image_processor, output, _ = exported
    embedder = OnnxClipEmbedder(output)
    images = random_images(batch_size, seed=batch_size, size=(70, 50))
    with torch.no_grad():
        expected_images = encode_images(model, image_processor(images=images, return_tensors="pt")["pixel_values"])
    actual_images = embedder.embed_images(images)
    assert actual_images.shape == expected_images.shape
    np.testing.assert_allclose(actual_images, expected_images.numpy(), rtol=0, atol=ATOL)

    if not (output / TEXT_FILE).exists():
        with pytest.raises(FileNotFoundError, match="without that tower"):
            embedder.embed_texts(CAPTIONS[:batch_size])
        return
    # Captions of different lengths: the batch of 7 is padded, so the exported padding mask is exercised.
    texts = CAPTIONS[:batch_size]
    expected_texts = encode_texts(model, tiny_clip_tokenizer(), texts)
    actual_texts = embedder.embed_texts(texts)
    np.testing.assert_allclose(actual_texts, expected_texts.numpy(), rtol=0, atol=ATOL)
    # Not vacuous: the towers give different embeddings to different inputs.
    assert batch_size == 1 or np.abs(actual_texts[0] - actual_texts[1]).max() > 10 * ATOL


def imported_modules(path: Path, module: str) -> set[str]:
    """Absolute names of every module `path` (the source of `module`) imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x` imports a module
    return names


def test_import_hf_clip_reaches_neither_onnx_nor_faiss():
    """Every hf_clip module that `import hf_clip` loads, followed through hf_clip's own imports (in functions too)."""
    root = Path(hf_clip.__file__).parent
    seen, external, queue = set(), set(), ["hf_clip"]
    while queue:
        module = queue.pop()
        relative = Path(*module.split(".")[1:])
        path = next((p for p in (root / relative / "__init__.py", root / f"{relative}.py") if p.is_file()), None)
        if module in seen or path is None:
            continue
        seen.add(module)
        for name in imported_modules(path, module):
            if name.split(".")[0] == "hf_clip":
                parts = name.split(".")
                queue.extend(".".join(parts[:depth]) for depth in range(2, len(parts) + 1))
            else:
                external.add(name.split(".")[0])
    assert "hf_clip.modeling_hf_clip" in seen and "transformers" in external  # the walk does follow imports
    assert not [module for module in seen if module.startswith(("hf_clip.onnx", "hf_clip.embedding"))]
    assert not external & {"onnx", "onnxruntime", "onnxscript", "faiss"}
