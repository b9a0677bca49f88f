"""Embed an image collection (and its captions) with any CLIP folder into clip-retrieval's layout.

    hf-clip-embed --model out/vit-b32 --data_format imagefolder --data_files photos/ --output_dir embeddings/
    accelerate launch examples/embed.py --model out/vit-b32 --data_format webdataset \\
        --data_files 'shards/*.tar' --text_column txt --embed image text --output_dir embeddings/

`--model` is an hf_clip or transformers CLIP folder (model, tokenizer, image processor), or with `--backend onnx` or
`onnx-int8` an ONNX folder (`hf-clip-export-onnx`, `hf-clip-quantize`); `--backend torch-int8` quantises the model's
Linear layers on load (`hf_clip.embedding.backends`); the output layout is the same for every backend. The input is
read by `hf_clip.data.formats` (local imagefolder, webdataset shards, parquet, arrow folders or csv); undecodable
images, missing fields, bad or empty captions (when captions are embedded) and broken shards are skipped and counted
by reason (`hf_clip.data.samples`), never fatal. The output is described in `hf_clip.embedding.layout`; how the input
is cut into parts, and which process embeds which, in `hf_clip.embedding.samples`. Run again with the same
arguments, a killed job embeds only the parts it had not
finished. A progress bar counts the main process's samples; at the end the main process prints and writes
`summary.json`: parts, stream examples, embedded samples, skipped samples by reason, and this run's samples per
second (all processes' samples over the slowest one's time).
"""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import HfArgumentParser
from transformers.hf_argparser import DataClassType

from ..data.formats import DataFormatName, DataSpec, data_format, resolve_files
from .backends import BACKENDS, check_backend, load_encoder
from .encoders import NUMPY_DTYPES, TORCH_DTYPES
from .layout import (
    CAPTION_COLUMN,
    JOB_FILE,
    KEY_COLUMN,
    MODALITIES,
    SUMMARY_FILE,
    PartRecord,
    finished_parts,
    read_record,
    summarize,
    write_part,
)
from .samples import PartBatches, count_parts, open_input


@dataclass
class EmbedConfig:
    """Every setting of an embedding job (command line: `--name value`)."""

    model: str = field(metadata={"help": "An hf_clip or transformers CLIP folder (model, tokenizer, processor)."})
    data_format: DataFormatName = field(metadata={"help": "imagefolder | webdataset | parquet | arrow | csv"})
    data_files: list[str] = field(
        metadata={"help": "The imagefolder's or arrow (save_to_disk) folder, or webdataset / parquet / csv globs."}
    )
    output_dir: str = field(metadata={"help": "Where img_emb/, text_emb/ and metadata/ are written."})
    embed: list[str] = field(default_factory=lambda: ["image"], metadata={"help": "image and/or text"})
    image_column: str | None = field(
        default=None, metadata={"help": "Default: the format's (hf_clip.data.formats), e.g. jpg for webdataset."}
    )
    text_column: str | None = field(default=None, metadata={"help": "Caption column, kept in the metadata."})
    key_column: str | None = field(
        default=None, metadata={"help": "Column naming each sample; default: webdataset key or image path."}
    )
    batch_size: int = 64
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers decoding images, per process."})
    part_size: int = field(
        default=1000,
        metadata={
            "help": "Images per part of an imagefolder or arrow folder (other formats: one part per file). A worker "
            "decodes whole parts, and a killed job redoes at most its unfinished ones: smaller parts, more "
            "parallelism and less redone, more files."
        },
    )
    output_dtype: str = field(default="float16", metadata={"help": "float16 | float32"})
    model_dtype: str = field(default="float32", metadata={"help": "float32 | float16 | bfloat16"})
    backend: str = field(
        default="torch",
        metadata={"help": f"{' | '.join(BACKENDS)} (hf_clip.embedding.backends); onnx ones take an ONNX folder."},
    )

    def __post_init__(self) -> None:
        data_format(self.data_format)  # a known format, or a clear error
        if not self.embed or not set(self.embed) <= set(MODALITIES):
            raise ValueError(f"embed must name one or both of {MODALITIES}, got {self.embed}.")
        if "text" in self.embed and self.text_column is None:
            raise ValueError("embedding text needs --text_column (the caption column).")
        if self.output_dtype not in NUMPY_DTYPES:
            raise ValueError(f"output_dtype must be one of {list(NUMPY_DTYPES)}, got {self.output_dtype!r}.")
        if self.model_dtype not in TORCH_DTYPES:
            raise ValueError(f"model_dtype must be one of {list(TORCH_DTYPES)}, got {self.model_dtype!r}.")
        check_backend(self.backend, dtype=self.model_dtype)
        if self.batch_size < 1 or self.part_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size and part_size must be positive and num_workers non-negative.")


# The settings that decide what the parts hold: a resumed job must not mix parts made under other ones.
JOB_SETTINGS = (
    "model",
    "data_format",
    "embed",
    "image_column",
    "text_column",
    "key_column",
    "part_size",
    "output_dtype",
    "model_dtype",
    "backend",
)


def job_settings(config: EmbedConfig, data_files: list[str]) -> dict[str, Any]:
    settings = {name: getattr(config, name) for name in JOB_SETTINGS}
    settings["model"] = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    settings["data_files"] = data_files
    return settings


def check_resumable(output_dir: Path, settings: dict[str, Any]) -> None:
    """Raises when `output_dir` holds parts of a job with other settings."""
    path = output_dir / JOB_FILE
    if not path.is_file():
        if finished_parts(output_dir):
            raise ValueError(f"{output_dir} holds parts but no {JOB_FILE}: not an hf_clip embedding folder.")
        return
    previous = json.loads(path.read_text())
    changed = sorted(name for name in settings.keys() | previous.keys() if settings.get(name) != previous.get(name))
    if changed:
        raise ValueError(
            f"{output_dir} holds a job with other settings ({', '.join(changed)}); use another --output_dir or "
            "delete it to start over."
        )


def check_complete(output_dir: Path, config: EmbedConfig, num_parts: int | None) -> None:
    """Every part exists: 0…P-1 for P input files; for input cut by rows, parts 0…P-1 with only the last one short."""
    numbers = finished_parts(output_dir)
    if num_parts is not None:
        missing = sorted(set(range(num_parts)) - set(numbers))
    else:
        missing = sorted(set(range(len(numbers))) - set(numbers))
        short = [n for n in numbers[:-1] if read_record(output_dir, n).examples != config.part_size]
        if short:
            raise RuntimeError(f"parts {short} cover fewer than part_size={config.part_size} images.")
    if missing:
        raise RuntimeError(f"parts {missing} were not written; run the job again to embed them.")


class PartBuffer:
    """The embedded batches of one part until its last batch arrives."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.captions: list[str | None] = []
        self.embeddings: dict[str, list[np.ndarray]] = {}

    def add(self, modality: str, matrix: np.ndarray) -> None:
        self.embeddings.setdefault(modality, []).append(matrix)


def embed_dataset(config: EmbedConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Embeds this process's unfinished parts; the main process returns the summary (the others an empty dict)."""
    accelerator = accelerator or Accelerator()
    output_dir = Path(config.output_dir)
    data_files = resolve_files(config.data_format, config.data_files)
    given = DataSpec(config.data_format, data_files, config.image_column, config.text_column)
    spec = open_input(given, config.key_column).spec  # the columns checked, the image column's default filled
    num_parts = count_parts(spec, config.key_column)
    settings = job_settings(config, data_files)
    check_resumable(output_dir, settings)  # every process, before anything is written: they fail together
    embed_images, embed_texts = "image" in config.embed, "text" in config.embed
    # The int8 and ONNX backends run on the CPU whatever device accelerate picked.
    device = accelerator.device if config.backend == "torch" else torch.device("cpu")
    encoder = load_encoder(config.model, config.backend, device, config.model_dtype, embed_images, embed_texts)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / JOB_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    finished = set(finished_parts(output_dir))
    preprocess = encoder.preprocess if embed_images else None
    parts = PartBatches(
        spec,
        preprocess,
        embed_texts,
        config.batch_size,
        config.part_size,
        accelerator.process_index,
        accelerator.num_processes,
        finished,
        config.key_column,
    )
    loader = torch.utils.data.DataLoader(
        parts, batch_size=None, num_workers=config.num_workers, collate_fn=PartBatches.collate
    )
    output_dtype = NUMPY_DTYPES[config.output_dtype]
    dim = encoder.embedding_dim
    buffers: dict[int, PartBuffer] = {}
    samples = parts_written = 0
    start = time.perf_counter()
    bar = tqdm(desc="embedding", unit=" samples", disable=not accelerator.is_local_main_process)
    for batch in loader:
        buffer = buffers.setdefault(batch["part"], PartBuffer())
        if batch["keys"]:
            if embed_images:
                buffer.add("image", encoder.embed_pixel_values(batch["pixel_values"]).astype(output_dtype))
            if embed_texts:
                buffer.add("text", encoder.embed_texts(batch["captions"]).astype(output_dtype))
            buffer.keys.extend(batch["keys"])
            if batch["captions"] is not None:
                buffer.captions.extend(batch["captions"])
        bar.update(len(batch["keys"]))
        if batch["end"]:
            del buffers[batch["part"]]
            record = PartRecord(batch["part"], batch["examples"], len(buffer.keys), batch["skipped"])
            metadata: dict[str, list] = {KEY_COLUMN: buffer.keys}
            if config.text_column is not None:
                metadata[CAPTION_COLUMN] = buffer.captions
            embeddings = {
                modality: np.concatenate(buffer.embeddings.get(modality, [np.zeros((0, dim), output_dtype)]))
                for modality in config.embed
            }
            write_part(output_dir, record, metadata, embeddings)
            samples += record.samples
            parts_written += 1
            bar.set_postfix(parts=parts_written)
    bar.close()
    elapsed = time.perf_counter() - start

    # (processes, 3): the run's rate is all samples over the slowest process's time.
    this_run = torch.tensor([[samples, parts_written, elapsed]], dtype=torch.float64, device=accelerator.device)
    every_process = accelerator.gather(this_run).cpu()
    run_samples, run_parts = every_process[:, :2].sum(dim=0).tolist()
    slowest = float(every_process[:, 2].max())
    if not accelerator.is_main_process:
        return {}
    check_complete(output_dir, config, num_parts)
    summary: dict[str, Any] = summarize(output_dir)
    summary["this_run"] = {
        "processes": accelerator.num_processes,
        "parts_embedded": int(run_parts),
        "parts_already_done": len(finished),
        "samples": int(run_samples),
        "seconds": round(slowest, 3),
        "samples_per_second": round(run_samples / slowest, 2) if slowest > 0 else None,
    }
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    (config,) = HfArgumentParser(DataClassType(EmbedConfig)).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    accelerator = Accelerator()
    summary = embed_dataset(config, accelerator)
    if accelerator.is_main_process:
        print(json.dumps(summary, indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    main()
