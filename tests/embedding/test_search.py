"""hf_clip.embedding.index and .search: the flat index equals a brute-force matrix product, approximate indexes report
their recall@10 and keep their search parameters through save/load, and text or image queries through the CLI
find what a brute-force search over the embedding folder finds."""

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from hf_clip import HfClipImageProcessor, HfClipModel
from hf_clip.embedding import index as index_module
from hf_clip.embedding import search as search_module
from hf_clip.embedding.index import EmbeddingIndex, IndexSettings, build_faiss_index, recall_at_k
from hf_clip.embedding.job import EmbedConfig, embed_dataset
from hf_clip.embedding.layout import JOB_FILE, PartRecord, load_embeddings, write_part
from hf_clip.testing_utils import TINY_IMAGE_SIZE, random_images, tiny_clip_tokenizer, tiny_config
from hf_clip.zero_shot import encode_texts


def unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def keys(count: int) -> pa.Table:
    return pa.table({"image_path": [f"img{i:04d}" for i in range(count)]})


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def test_flat_search_equals_brute_force():
    rng = np.random.default_rng(0)
    vectors, queries = unit_vectors(rng, 500, 24), unit_vectors(rng, 6, 24)
    index = EmbeddingIndex.from_vectors(vectors, keys(500), IndexSettings())
    hits = index.search(queries, k=10)
    order, scores = brute_force(vectors, queries, 10)
    for row, query_hits in enumerate(hits):
        assert [hit["image_path"] for hit in query_hits] == [f"img{i:04d}" for i in order[row]]
        np.testing.assert_allclose([hit["score"] for hit in query_hits], scores[row], rtol=0, atol=1e-6)
    assert "recall@10" not in index.info  # exact: nothing to measure


def test_index_of_an_embedding_folder_follows_part_order_and_survives_save_load(tmp_path):
    rng = np.random.default_rng(1)
    vectors = unit_vectors(rng, 12, 8).astype(np.float16)
    for number, rows in ((1, slice(7, 12)), (0, slice(0, 7))):  # written out of order, read in part order
        metadata = {"image_path": keys(12).column("image_path").to_pylist()[rows]}
        write_part(tmp_path / "emb", PartRecord(number, 7, 5 if number else 7), metadata, {"image": vectors[rows]})
    (tmp_path / "emb" / JOB_FILE).write_text(json.dumps({"model": "some/model"}))
    index = EmbeddingIndex.from_embedding_folder(tmp_path / "emb")
    assert index.info["model"] == "some/model" and index.info["count"] == 12
    query = vectors[9:10].astype(np.float32)
    assert index.search(query, k=1)[0][0]["image_path"] == "img0009"
    index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.search(query, k=12) == index.search(query, k=12)
    with pytest.raises(FileNotFoundError, match="text index"):
        EmbeddingIndex.load(tmp_path / "index", "text")


def test_approximate_indexes_report_recall_and_keep_search_parameters(tmp_path):
    rng = np.random.default_rng(2)
    centres = unit_vectors(rng, 40, 32)
    vectors = centres[rng.integers(0, 40, 4000)] + 0.15 * unit_vectors(rng, 4000, 32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = unit_vectors(rng, 200, 32)
    exact = build_faiss_index(vectors, IndexSettings())
    _, truth = exact.search(queries, 10)

    hnsw = EmbeddingIndex.from_vectors(vectors, keys(4000), IndexSettings(index_type="hnsw", recall_queries=500))
    assert hnsw.info["recall@10"] >= 0.9
    # One cell of 64 searched: a real approximation, whose measured recall is a mean over-the-top-10 overlap.
    coarse = EmbeddingIndex.from_vectors(vectors, keys(4000), IndexSettings(index_type="ivf", nlist=64, nprobe=1))
    _, found = coarse.index.search(queries, 10)
    overlap = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall_at_k(coarse.index, exact, queries) == pytest.approx(overlap)
    assert 0.0 < coarse.info["recall@10"] < hnsw.info["recall@10"]

    coarse.save(tmp_path / "ivf")
    loaded = EmbeddingIndex.load(tmp_path / "ivf")
    assert loaded.info["nlist"] == 64 and loaded.search(queries[:5], 10) == coarse.search(queries[:5], 10)


@pytest.fixture(scope="module")
def indexed_photos(tmp_path_factory):
    """An imagefolder of 12 JPEGs embedded by the job with a tiny model, and its flat index."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared CPU
    root = tmp_path_factory.mktemp("search")
    torch.manual_seed(0)
    model = HfClipModel(tiny_config()).eval()
    model.save_pretrained(root / "model")
    tiny_clip_tokenizer().save_pretrained(root / "model")
    size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    HfClipImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size=size).save_pretrained(root / "model")
    (root / "photos").mkdir()
    for number, image in enumerate(random_images(12, seed=5, size=(60, 45))):
        image.save(root / "photos" / f"{number:02d}.jpg", quality=90)
    config = EmbedConfig(
        model=str(root / "model"),
        data_format="imagefolder",
        data_files=[str(root / "photos")],
        output_dir=str(root / "embeddings"),
        num_workers=0,
    )
    embed_dataset(config)
    index_module.main(["--embedding_folder", str(root / "embeddings"), "--index_folder", str(root / "index")])
    yield root, model
    torch.set_num_threads(threads)


def run_search_cli(capsys, argv: list[str]) -> list[dict]:
    capsys.readouterr()
    search_module.main(argv)
    return json.loads(capsys.readouterr().out)


def test_text_and_image_queries_through_the_cli(indexed_photos, capsys):
    root, model = indexed_photos
    vectors, metadata = load_embeddings(root / "embeddings")
    text = "a photo of a cat"
    hits = run_search_cli(capsys, ["--index_folder", str(root / "index"), "--text", text, "--k", "5"])
    query = encode_texts(model, tiny_clip_tokenizer(), [text]).numpy()
    order, scores = brute_force(vectors, query, 5)
    assert [hit["image_path"] for hit in hits] == [metadata.column("image_path")[int(i)].as_py() for i in order[0]]
    np.testing.assert_allclose([hit["score"] for hit in hits], scores[0], rtol=0, atol=1e-6)

    # An image of the collection finds itself first (scores from float16 storage: about 1).
    photo = root / "photos" / "07.jpg"
    hits = run_search_cli(capsys, ["--index_folder", str(root / "index"), "--image", str(photo), "--k", "3"])
    assert hits[0]["image_path"] == str(photo) and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert hits[1]["score"] < hits[0]["score"]


def test_search_rejects_ambiguous_queries(indexed_photos):
    root, _ = indexed_photos
    searcher = search_module.ClipSearcher.from_pretrained(str(root / "index"))
    with pytest.raises(ValueError, match="exactly one"):
        searcher.search(text="a cat", image=str(root / "photos" / "00.jpg"))
    with pytest.raises(ValueError, match="non-empty"):
        searcher.search(text="  ")
    with pytest.raises(ValueError, match="not an image"):
        searcher.search(image=io.BytesIO(b"junk").getvalue())
