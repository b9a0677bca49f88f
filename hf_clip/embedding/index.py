"""A faiss index over an embedding folder, saved with the keys it returns.

    hf-clip-index --embedding_folder embeddings/ --index_folder index/                     # exact (flat)
    hf-clip-index --embedding_folder embeddings/ --index_folder index/ --index_type hnsw  # + its recall@10

Embeddings are L2-normalised, so inner product is cosine similarity. `flat` scores every vector (exact, the
default); `ivf` (inverted lists over k-means cells, `nprobe` cells searched) and `hnsw` (a navigable graph,
`ef_search` candidates kept) trade exactness for speed. An approximate index is measured when built: recall@10
against the exact top 10 for up to 1,000 stored vectors used as queries (each one's own row left out), saved with
it and printed.

The saved folder holds `{modality}.index` (faiss), `{modality}_metadata.parquet` (one row per vector: the key
`image_path` and the caption when the job kept one) and `{modality}_index.json` (type, parameters, size, recall,
the model that made the embeddings). Building loads every embedding into memory as float32.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import HfArgumentParser
from transformers.hf_argparser import DataClassType

from .layout import JOB_FILE, MODALITIES, load_embeddings

INDEX_TYPES = ("flat", "ivf", "hnsw")
RECALL_K = 10


@dataclass
class IndexSettings:
    """How an index is built and searched (command line: `--name value`)."""

    index_type: str = field(default="flat", metadata={"help": "flat (exact) | ivf | hnsw"})
    nlist: int | None = field(default=None, metadata={"help": "ivf cells; default 4·√n, at least 39 vectors each."})
    nprobe: int = field(default=16, metadata={"help": "ivf cells searched per query."})
    hnsw_m: int = field(default=32, metadata={"help": "hnsw neighbours per node."})
    ef_construction: int = field(default=80, metadata={"help": "hnsw candidates kept while building."})
    ef_search: int = field(default=64, metadata={"help": "hnsw candidates kept while searching."})
    recall_queries: int = field(default=1000, metadata={"help": "Stored vectors used to measure recall@10."})
    seed: int = 0

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}.")


def build_faiss_index(vectors: np.ndarray, settings: IndexSettings) -> faiss.Index:
    """An inner-product index of `settings.index_type` holding `vectors` (float32, (n, dim))."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    index: faiss.Index
    if settings.index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif settings.index_type == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = settings.ef_construction
        hnsw.hnsw.efSearch = settings.ef_search
        index = hnsw
    else:
        # k-means wants about 39 training vectors per cell; fewer cells than that leave cells empty.
        nlist = settings.nlist or max(1, min(int(4 * np.sqrt(count)), count // 39))
        if nlist > count:
            raise ValueError(f"an ivf index of {nlist} cells needs at least {nlist} vectors, got {count}.")
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(vectors)
        ivf.nprobe = min(settings.nprobe, nlist)
        index = ivf
    index.add(vectors)
    return index


def recall_at_k(
    approximate: faiss.Index,
    exact: faiss.Index,
    queries: np.ndarray,
    k: int = RECALL_K,
    query_ids: np.ndarray | None = None,
) -> float:
    """Mean fraction of each query's exact top `k` that the approximate index also returns in its top `k`.

    `query_ids`: the rows the queries were taken from, left out of both lists (finding itself proves nothing).
    """
    extra = 0 if query_ids is None else 1
    _, exact_ids = exact.search(queries, k + extra)
    _, found_ids = approximate.search(queries, k + extra)
    own = np.full(len(queries), -1) if query_ids is None else query_ids
    recalls = []
    for truth, found, row in zip(exact_ids.tolist(), found_ids.tolist(), own.tolist(), strict=True):
        truth_top = [i for i in truth if i not in (-1, row)][:k]  # -1: fewer rows than asked for
        found_top = [i for i in found if i not in (-1, row)][:k]
        if truth_top:
            recalls.append(len(set(truth_top) & set(found_top)) / len(truth_top))
    return float(np.mean(recalls)) if recalls else 1.0


class EmbeddingIndex:
    """A faiss index and the metadata of its rows: `search` returns the metadata of the best rows with scores."""

    def __init__(self, index: faiss.Index, metadata: pa.Table, info: dict[str, Any]):
        if index.ntotal != metadata.num_rows:
            raise ValueError(f"the index holds {index.ntotal} vectors but the metadata {metadata.num_rows} rows.")
        self.index = index
        self.metadata = metadata
        self.info = info

    @classmethod
    def from_vectors(
        cls, vectors: np.ndarray, metadata: pa.Table, settings: IndexSettings, info: dict[str, Any] | None = None
    ) -> "EmbeddingIndex":
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        start = time.perf_counter()
        index = build_faiss_index(vectors, settings)
        info = {**(info or {}), **asdict(settings), "count": len(vectors), "dim": int(vectors.shape[1])}
        info["build_seconds"] = round(time.perf_counter() - start, 3)
        if settings.index_type == "ivf":
            info["nlist"] = int(faiss.extract_index_ivf(index).nlist)
        if settings.index_type != "flat":
            rng = np.random.default_rng(settings.seed)
            rows = np.sort(rng.choice(len(vectors), size=min(settings.recall_queries, len(vectors)), replace=False))
            exact = build_faiss_index(vectors, IndexSettings(index_type="flat"))
            info[f"recall@{RECALL_K}"] = recall_at_k(index, exact, vectors[rows], RECALL_K, query_ids=rows)
        return cls(index, metadata, info)

    @classmethod
    def from_embedding_folder(
        cls, folder: str | Path, modality: str = "image", settings: IndexSettings | None = None
    ) -> "EmbeddingIndex":
        """Indexes every part of an embedding job's folder (`hf_clip.embedding.layout`), in part order."""
        vectors, metadata = load_embeddings(folder, modality)
        info: dict[str, Any] = {"modality": modality, "embedding_folder": str(Path(folder).resolve())}
        job_file = Path(folder) / JOB_FILE
        if job_file.is_file():
            job = json.loads(job_file.read_text())
            info["model"], info["backend"] = job.get("model"), job.get("backend", "torch")
        return cls.from_vectors(vectors, metadata, settings or IndexSettings(), info)

    @property
    def modality(self) -> str:
        return str(self.info.get("modality", "image"))

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[dict[str, Any]]]:
        """For each query vector, the `k` best rows (best first) as their metadata plus `score` (cosine)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.index.d:
            raise ValueError(f"queries have {queries.shape[1]} dimensions but the index {self.index.d}.")
        scores, ids = self.index.search(queries, min(k, self.index.ntotal))
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            found = row_ids >= 0  # an approximate index may return fewer than k
            rows = self.metadata.take(pa.array(row_ids[found])).to_pylist()
            results.append([{**row, "score": float(s)} for row, s in zip(rows, row_scores[found], strict=True)])
        return results

    def save(self, folder: str | Path) -> None:
        directory = Path(folder)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / f"{self.modality}.index"))
        pq.write_table(self.metadata, directory / f"{self.modality}_metadata.parquet")
        (directory / f"{self.modality}_index.json").write_text(json.dumps(self.info, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, modality: str = "image") -> "EmbeddingIndex":
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
        directory = Path(folder)
        names = [f"{modality}.index", f"{modality}_metadata.parquet", f"{modality}_index.json"]
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} holds no saved {modality} index: missing {', '.join(missing)}.")
        index = faiss.read_index(str(directory / names[0]))
        info = json.loads((directory / names[2]).read_text())
        # The search-time parameters as built (faiss's own setter, whatever the index type).
        if info.get("index_type") == "ivf":
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", min(info["nprobe"], info["nlist"]))
        elif info.get("index_type") == "hnsw":
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", info["ef_search"])
        return cls(index, pq.read_table(directory / names[1]), info)


@dataclass
class IndexCommand:
    embedding_folder: str = field(metadata={"help": "Output folder of hf-clip-embed."})
    index_folder: str = field(metadata={"help": "Where the index, its metadata and its description are saved."})
    modality: str = field(default="image", metadata={"help": "image | text: which embeddings to index."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((DataClassType(IndexCommand), DataClassType(IndexSettings)))
    command, settings = parser.parse_args_into_dataclasses(args=argv)
    index = EmbeddingIndex.from_embedding_folder(command.embedding_folder, command.modality, settings)
    index.save(command.index_folder)
    print(json.dumps(index.info, indent=2))


if __name__ == "__main__":
    main()
