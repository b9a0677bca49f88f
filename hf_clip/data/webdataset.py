"""`datasets`' webdataset reader, made to lose one sample per bad sample and one shard per broken shard.

The stock builder decodes `.txt` members as UTF-8 inside its reader (one caption in another encoding raises and ends
the whole stream) and stops silently at a tar cut between two members. This subclass keeps captions as bytes (decoded
per sample, `hf_clip.data.samples`), reads each tar itself, and turns a tar that cannot be read to its end (cut
inside a member or a header, or missing the end-of-archive blocks) into one marker example (`BROKEN_COLUMN`, see
`hf_clip.data.archives`) after the samples read before the break; the stream goes on with the next shard.
"""

import os
import tarfile
from collections.abc import Iterator
from typing import IO, Any

import datasets
from datasets.data_files import DataFilesDict
from datasets.packaged_modules.webdataset.webdataset import WebDataset

from .archives import BROKEN_COLUMN

TEXT_EXTENSIONS = ("txt", "text", "transcript")
TAR_BLOCK = 512


class SampleLevelWebDataset(WebDataset):
    DECODERS = {
        extension: decode for extension, decode in WebDataset.DECODERS.items() if extension not in TEXT_EXTENSIONS
    }

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        splits = super()._split_generators(dl_manager)
        self.info.features[BROKEN_COLUMN] = datasets.Value("string")
        return splits

    def _generate_examples(self, tar_paths: list[str], tar_iterators: list[Any]) -> Iterator[tuple[Any, dict]]:
        keys = [name for name in self.info.features if name != BROKEN_COLUMN]
        media = [name for name, feature in self.info.features.items() if isinstance(feature, datasets.Image)]
        for tar_index, tar_path in enumerate(tar_paths):
            index = 0
            try:
                for example in self._get_pipeline_from_tar(tar_path, _tar_members(tar_path)):
                    row = {name: example.get(name) for name in keys}
                    for name in media:
                        if row[name] is not None:
                            row[name] = {"path": f"{example['__key__']}.{name}", "bytes": row[name]}
                    yield (tar_index, index), {**row, BROKEN_COLUMN: None}
                    index += 1
            except (tarfile.TarError, OSError, EOFError) as error:
                broken = dict.fromkeys(keys)
                broken.update({"__key__": os.path.basename(tar_path), "__url__": tar_path})
                yield (tar_index, index), {**broken, BROKEN_COLUMN: f"{tar_path}: {error}"}


def _tar_members(path: str) -> Iterator[tuple[str, IO[bytes]]]:
    """The regular files of a tar, in order; raises `tarfile.ReadError` where the archive is cut short (the stdlib
    reader in stream mode ends silently at a cut header or a missing end-of-archive marker)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file, tarfile.open(fileobj=file, mode="r|*") as stream:
        for member in stream:
            if member.isreg() and not os.path.basename(member.name).startswith((".", "__")):
                handle = stream.extractfile(member)
                assert handle is not None  # a regular file
                yield member.name, handle
        # A complete archive ends with two zero blocks after its last member (checked where offsets are the file's:
        # an uncompressed tar).
        uncompressed = getattr(stream.fileobj, "comptype", "tar") == "tar"
        if uncompressed and size < stream.offset + 2 * TAR_BLOCK:
            raise tarfile.ReadError(f"the archive ends at byte {size} without its end-of-archive blocks (cut short)")


def sample_level_webdataset(files: list[str], split: str) -> SampleLevelWebDataset:
    return SampleLevelWebDataset(data_files=DataFilesDict.from_patterns({split: files}))
