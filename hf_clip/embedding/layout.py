"""The embedding folder, in clip-retrieval's layout, so its `index` and `back` commands and autofaiss read it as is:

    img_emb/img_emb_N.npy          (rows, dim) float16 or float32, L2-normalised image embeddings
    text_emb/text_emb_N.npy        the same for captions (when text is embedded)
    metadata/metadata_N.parquet    one row per embedding row, same order: `image_path` (the sample's key) and,
                                   when the data has captions, `caption`
    embedding_job.json             the job's settings (a resumed job must match them)
    summary.json                   totals over all parts, written when a job finishes

N is the part number, zero-padded to six digits so that the three folders sort alike. A part is written
embeddings first and metadata last, each file under a temporary name renamed into place, so a part is finished
exactly when its metadata file exists: a killed job leaves no half-written part that a resumed one would trust.
Each metadata file carries the part's counts (stream examples covered, samples skipped by reason, captions
truncated) in its parquet
schema metadata, so totals survive resumption without a separate ledger.
"""

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MODALITIES = ("image", "text")
EMBEDDING_FOLDERS = {"image": "img_emb", "text": "text_emb"}
METADATA_FOLDER = "metadata"
KEY_COLUMN = "image_path"  # clip-retrieval's name for the sample's key: a file path, a webdataset key, ...
CAPTION_COLUMN = "caption"
JOB_FILE = "embedding_job.json"
SUMMARY_FILE = "summary.json"
PART_DIGITS = 6
RECORD_METADATA_KEY = b"hf_clip_part"


@dataclass
class PartRecord:
    """What one part covered: `examples` stream examples, of which `samples` were embedded and the rest skipped;
    `truncated_captions` of the embedded captions were cut to the model's text context."""

    number: int
    examples: int
    samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_captions: int = 0  # absent from parts written before it was counted


def part_name(number: int) -> str:
    return f"{number:0{PART_DIGITS}d}"


def embedding_path(folder: str | Path, modality: str, number: int) -> Path:
    prefix = EMBEDDING_FOLDERS[modality]
    return Path(folder) / prefix / f"{prefix}_{part_name(number)}.npy"


def metadata_path(folder: str | Path, number: int) -> Path:
    return Path(folder) / METADATA_FOLDER / f"{METADATA_FOLDER}_{part_name(number)}.parquet"


def _replace_into_place(temporary: Path, final: Path) -> None:
    # fsync first: after a crash, a renamed file must not turn out empty.
    with temporary.open("rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, final)


def write_part(
    folder: str | Path,
    record: PartRecord,
    metadata: Mapping[str, list],
    embeddings: Mapping[str, np.ndarray],
) -> None:
    """Writes one finished part: each embedding matrix, then the metadata table (which marks the part done)."""
    rows = {name: len(values) for name, values in metadata.items()}
    rows.update({modality: len(matrix) for modality, matrix in embeddings.items()})
    if set(rows.values()) != {record.samples}:
        raise ValueError(f"part {record.number}: metadata and embeddings disagree on the row count ({rows}).")
    for modality, matrix in embeddings.items():
        path = embedding_path(folder, modality, record.number)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")  # not *.npy: readers globbing the folder skip it
        with temporary.open("wb") as file:
            np.save(file, matrix)
        _replace_into_place(temporary, path)
    path = metadata_path(folder, record.number)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(dict(metadata)).replace_schema_metadata({RECORD_METADATA_KEY: json.dumps(asdict(record))})
    temporary = path.with_name(path.name + ".tmp")
    pq.write_table(table, temporary)
    _replace_into_place(temporary, path)


def finished_parts(folder: str | Path) -> list[int]:
    """The numbers of the parts whose metadata file exists, ascending."""
    directory = Path(folder) / METADATA_FOLDER
    if not directory.is_dir():
        return []
    prefix = f"{METADATA_FOLDER}_"
    return sorted(int(path.stem[len(prefix) :]) for path in directory.glob(f"{prefix}*.parquet"))


def read_record(folder: str | Path, number: int) -> PartRecord:
    path = metadata_path(folder, number)
    schema_metadata = pq.read_schema(path).metadata or {}
    if RECORD_METADATA_KEY not in schema_metadata:
        raise ValueError(f"{path} was not written by hf_clip's embedding job (no part record).")
    return PartRecord(**json.loads(schema_metadata[RECORD_METADATA_KEY]))


def load_embeddings(folder: str | Path, modality: str = "image") -> tuple[np.ndarray, pa.Table]:
    """All parts' `modality` embeddings as one float32 matrix and their metadata as one table, in part order."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    numbers = finished_parts(folder)
    if not numbers:
        raise FileNotFoundError(f"{folder} holds no finished parts ({METADATA_FOLDER}/{METADATA_FOLDER}_N.parquet).")
    matrices, tables = [], []
    for number in numbers:
        path = embedding_path(folder, modality, number)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: was the job run with {modality} embeddings?")
        matrix = np.load(path)
        table = pq.read_table(metadata_path(folder, number))
        if matrix.ndim != 2 or len(matrix) != table.num_rows:
            raise ValueError(f"{path} has shape {matrix.shape} but its metadata has {table.num_rows} rows.")
        matrices.append(matrix)
        tables.append(table.replace_schema_metadata(None))
    return np.concatenate(matrices).astype(np.float32, copy=False), pa.concat_tables(tables)


def summarize(folder: str | Path) -> dict[str, object]:
    """Totals over the finished parts: parts, stream examples, embedded samples, skipped samples by reason and
    truncated captions."""
    records = [read_record(folder, number) for number in finished_parts(folder)]
    skipped: dict[str, int] = {}
    for record in records:
        for reason, count in record.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    return {
        "parts": len(records),
        "examples": sum(record.examples for record in records),
        "samples": sum(record.samples for record in records),
        "skipped": skipped,
        "truncated_captions": sum(record.truncated_captions for record in records),
    }
