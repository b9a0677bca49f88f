"""Int8 towers (hf_clip.onnx.quantize) and the embedding backends (hf_clip.embedding.backends): real onnxruntime
quantisation and sessions on tiny ViT and ResNet folders, embeddings close to fp32 by cosine but not equal to them
(the graphs are quantised), an embedding job written with an int8 backend, killed and resumed, in the same layout
as the fp32 job, search on its index, and clear errors for wrong folders, backends and training an int8 folder."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hf_clip import HfClipImageProcessor, HfClipModel
from hf_clip.embedding import job
from hf_clip.embedding import search as search_module
from hf_clip.embedding.backends import load_encoder
from hf_clip.embedding.index import main as index_main
from hf_clip.embedding.job import EmbedConfig, embed_dataset
from hf_clip.embedding.layout import embedding_path, finished_parts, load_embeddings
from hf_clip.onnx.export import export_onnx
from hf_clip.onnx.folders import QUANTIZATION_FILE, TEXT_FILE, VISION_FILE
from hf_clip.onnx.quantize import quantize_onnx, quantize_torch
from hf_clip.onnx.runtime import OnnxClipEmbedder
from hf_clip.testing_utils import TINY_RESNET, TINY_VIT, random_images, tiny_clip_tokenizer, tiny_config
from hf_clip.training.builders import architecture
from hf_clip.training.config import TrainConfig
from hf_clip.zero_shot import encode_images, encode_texts

CAPTIONS = ["a red square", "a photo of a dog.", "two cats on a mat", "blue"]
MIN_COSINE = 0.99


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def folders(request, tmp_path_factory) -> dict:
    """An fp32 model folder, its calibration images, and its dynamic and static int8 folders."""
    torch.manual_seed(0)
    model = HfClipModel(tiny_config(request.param)).eval()
    size = model.config.vision_config.image_size
    root = tmp_path_factory.mktemp("quantize")
    model.save_pretrained(root / "model")
    tiny_clip_tokenizer().save_pretrained(root / "model")
    HfClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        root / "model"
    )
    (root / "calibration").mkdir()
    for number, image in enumerate(random_images(24, seed=11, size=(60, 45))):
        image.save(root / "calibration" / f"{number:02d}.png")
    dynamic = quantize_onnx(str(root / "model"), root / "dynamic")
    static = quantize_onnx(str(root / "model"), root / "static", "static", str(root / "calibration"), 16)
    return {"root": root, "model": model, "dynamic": dynamic, "static": static, "backbone": request.param["backbone"]}


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def cosines(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return (actual * expected).sum(axis=1)


def test_quantized_folders_record_their_method_and_hold_int8_graphs(folders):
    root = folders["root"]
    assert folders["dynamic"]["towers"] == {"vision": "dynamic", "text": "dynamic"}
    assert folders["static"]["towers"] == {"vision": "static", "text": "dynamic"}
    assert folders["static"]["calibration_images"] == 16
    assert json.loads((root / "static" / QUANTIZATION_FILE).read_text()) == folders["static"]
    # Dynamic: integer matmuls with activations quantised at run time; static: QDQ pairs around int8 weights.
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= op_types(root / "dynamic" / TEXT_FILE)
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(root / "static" / VISION_FILE)
    dynamic_vision = op_types(root / "dynamic" / VISION_FILE)
    assert "DynamicQuantizeLinear" in dynamic_vision
    if folders["backbone"] == "resnet":  # convolutions are left in fp32: ConvInteger is slower than fp32 Conv
        assert "Conv" in dynamic_vision and "ConvInteger" not in dynamic_vision
        assert "ConvInteger" not in op_types(root / "static" / VISION_FILE)


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_int8_onnx_embeddings_are_close_to_fp32_but_quantised(folders, method):
    model, root = folders["model"], folders["root"]
    embedder = OnnxClipEmbedder(root / method)
    assert embedder.quantization == folders[method]
    images = random_images(6, seed=4, size=(70, 50))
    processor = HfClipImageProcessor.from_pretrained(root / "model")
    with torch.no_grad():
        expected_images = encode_images(model, processor(images=images, return_tensors="pt")["pixel_values"]).numpy()
    actual_images = embedder.embed_images(images)
    assert cosines(actual_images, expected_images).min() >= MIN_COSINE
    assert np.abs(actual_images - expected_images).max() > 1e-4  # not the fp32 graph
    expected_texts = encode_texts(model, tiny_clip_tokenizer(), CAPTIONS).numpy()
    actual_texts = embedder.embed_texts(CAPTIONS)
    assert cosines(actual_texts, expected_texts).min() >= MIN_COSINE
    assert np.abs(actual_texts - expected_texts).max() > 1e-4


def test_torch_int8_quantises_linear_layers_only(folders):
    model = folders["model"]
    quantized = quantize_torch(model)
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    assert not any(type(module) is nn.Linear for module in quantized.modules())
    assert sum(isinstance(module, dynamic_linear) for module in quantized.modules()) > 0
    assert sum(isinstance(module, nn.Conv2d) for module in quantized.modules()) == sum(
        isinstance(module, nn.Conv2d) for module in model.modules()
    )  # ResNet convolutions (and the ViT patch embedding) stay fp32
    pixels = torch.randn(4, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    expected, actual = encode_images(model, pixels).numpy(), encode_images(quantized, pixels).numpy()
    assert cosines(actual, expected).min() >= MIN_COSINE and np.abs(actual - expected).max() > 1e-5


def write_photos(folder: Path, count: int) -> None:
    folder.mkdir()
    for number, image in enumerate(random_images(count, seed=2, size=(60, 45))):
        image.save(folder / f"photo{number:02d}.jpg", quality=90)


class Killed(BaseException):
    """What a SIGKILL looks like from inside: nothing after it runs."""


def test_int8_job_resumes_in_the_fp32_layout_and_is_searchable(folders, tmp_path, monkeypatch):
    root = folders["root"]
    write_photos(tmp_path / "photos", 10)
    common = {"data_format": "imagefolder", "data_files": [str(tmp_path / "photos")], "part_size": 4}
    common.update(batch_size=3, num_workers=0, output_dtype="float32")
    embed_dataset(EmbedConfig(model=str(root / "model"), output_dir=str(tmp_path / "fp32"), **common))

    settings = {"model": str(root / "dynamic"), "backend": "onnx-int8", **common}
    write_part = job.write_part

    def killed_while_writing_part_1(folder, record, metadata, embeddings):
        if record.number == 1:
            np.save(embedding_path(folder, "image", 1), embeddings["image"])
            raise Killed
        write_part(folder, record, metadata, embeddings)

    monkeypatch.setattr(job, "write_part", killed_while_writing_part_1)
    with pytest.raises(Killed):
        embed_dataset(EmbedConfig(output_dir=str(tmp_path / "int8"), **settings))
    monkeypatch.undo()
    assert finished_parts(tmp_path / "int8") == [0]
    summary = embed_dataset(EmbedConfig(output_dir=str(tmp_path / "int8"), **settings))
    assert summary["this_run"]["parts_already_done"] == 1 and summary["this_run"]["parts_embedded"] == 2

    listing = sorted(str(path.relative_to(tmp_path / "fp32")) for path in (tmp_path / "fp32").rglob("*"))
    assert sorted(str(path.relative_to(tmp_path / "int8")) for path in (tmp_path / "int8").rglob("*")) == listing
    fp32, fp32_metadata = load_embeddings(tmp_path / "fp32")
    int8, int8_metadata = load_embeddings(tmp_path / "int8")
    assert int8_metadata.equals(fp32_metadata) and int8.shape == fp32.shape == (10, 16)
    assert cosines(int8, fp32).min() >= MIN_COSINE and np.abs(int8 - fp32).max() > 1e-4

    torch_int8 = tmp_path / "torch-int8"
    embed_dataset(EmbedConfig(model=str(root / "model"), backend="torch-int8", output_dir=str(torch_int8), **common))
    assert cosines(load_embeddings(torch_int8)[0], fp32).min() >= MIN_COSINE

    with pytest.raises(ValueError, match="backend"):  # a resumed job keeps its backend
        embed_dataset(EmbedConfig(model=str(root / "model"), output_dir=str(tmp_path / "int8"), **common))

    # The index records the backend; search embeds queries with it (the int8 folder's towers).
    index_main(["--embedding_folder", str(tmp_path / "int8"), "--index_folder", str(tmp_path / "index")])
    searcher = search_module.ClipSearcher.from_pretrained(str(tmp_path / "index"))
    assert isinstance(searcher.encoder, OnnxClipEmbedder) and searcher.encoder.quantization is not None
    photo = tmp_path / "photos" / "photo07.jpg"
    hits = searcher.search(image=str(photo), k=2)
    assert hits[0]["image_path"] == str(photo) and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_wrong_folders_and_backends_fail_by_name(folders, tmp_path):
    root = folders["root"]
    model_folder = str(root / "model")
    with pytest.raises(FileNotFoundError, match=r"needs an ONNX folder.*neither vision_model.onnx"):
        load_encoder(model_folder, "onnx-int8")
    with pytest.raises(FileNotFoundError, match=r"neither vision_model.onnx nor text_model.onnx"):
        OnnxClipEmbedder(model_folder)
    with pytest.raises(ValueError, match=r"ONNX folder without PyTorch weights.*'onnx' or 'onnx-int8'"):
        load_encoder(str(root / "dynamic"), "torch")
    with pytest.raises(ValueError, match=r"int8 towers.*use backend 'onnx-int8'"):
        load_encoder(str(root / "dynamic"), "onnx")
    export_onnx(model_folder, tmp_path / "fp32-onnx", ["vision"])
    with pytest.raises(ValueError, match="fp32 ONNX towers: quantise them with hf-clip-quantize"):
        load_encoder(str(tmp_path / "fp32-onnx"), "onnx-int8")
    with pytest.raises(FileNotFoundError, match=r"no text_model\.onnx"):
        load_encoder(str(tmp_path / "fp32-onnx"), "onnx", images=False, text=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        EmbedConfig(model=model_folder, data_format="imagefolder", data_files=["x"], output_dir="y", backend="int8")
    with pytest.raises(ValueError, match="runs float32 inputs on the CPU"):
        EmbedConfig(
            model=model_folder, data_format="imagefolder", data_files=["x"], output_dir="y", backend="torch-int8",
            model_dtype="bfloat16",
        )  # fmt: skip
    with pytest.raises(ValueError, match="calibration_images"):
        quantize_onnx(model_folder, tmp_path / "no-calibration", "static")
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_onnx(model_folder, tmp_path / "bad", "float8")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        quantize_onnx(str(tmp_path / "missing"), tmp_path / "bad")
    # Training from an int8 folder: refused where the training builder first reads the folder.
    tokenizer = tiny_clip_tokenizer()
    with pytest.raises(ValueError, match=r"static is an int8 ONNX folder \(hf-clip-quantize\).*no trainable weights"):
        architecture(TrainConfig(model_name_or_path=str(root / "static")), tokenizer)
    assert architecture(TrainConfig(model_name_or_path=model_folder), tokenizer).projection_dim == 16
