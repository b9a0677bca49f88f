"""`datasets`' webdataset reader, made to lose one sample per bad sample and one shard per broken shard.

The stock builder decodes `.txt` members as UTF-8 inside its reader (one caption in another encoding raises and ends
the whole stream) and stops silently at a tar cut between two members. This subclass keeps captions as bytes (decoded
per sample, `hf_clip.data.samples`), reads each tar itself, and turns a tar that cannot be read to its end (cut
inside a member or at a header, or missing the end-of-archive blocks) into one marker example (`BROKEN_COLUMN`, see
`hf_clip.data.archives`) after the samples read before the break; the stream goes on with the next shard.
"""

import itertools
import os
import tarfile
from collections.abc import Iterator
from typing import IO, Any

import datasets
import pyarrow as pa
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
        if not self.info.features:
            first_split = next(iter(self.config.data_files.values()))
            self.info.features = self._infer_features(first_split[0])
        return super()._split_generators(dl_manager)

    def _infer_features(self, tar_path: str) -> datasets.Features:
        """The columns of the first samples, united: the stock inference refuses a shard whose first samples do not
        all hold the same members, so one sample without its caption would stop the run before it starts."""
        examples = []
        try:
            for example in itertools.islice(self._get_pipeline_from_tar(tar_path, TarMembers(tar_path)), 20):
                examples.append(example)
        except (tarfile.TarError, OSError, EOFError):
            pass  # a broken first shard: infer from what it holds, the reader counts the break
        names = list(dict.fromkeys(name for example in examples for name in example))
        if not examples:
            raise ValueError(f"{tar_path} holds no webdataset samples to infer its columns from.")
        tables = [pa.Table.from_pylist([{name: example.get(name) for name in names}]) for example in examples]
        features = datasets.Features.from_arrow_schema(pa.concat_tables(tables, promote_options="default").schema)
        for name in names:
            if name.rsplit(".", 1)[-1].lower() in self.IMAGE_EXTENSIONS:
                features[name] = datasets.Image()
        features[BROKEN_COLUMN] = datasets.Value("string")
        return features

    def _generate_examples(self, tar_paths: list[str], tar_iterators: list[Any]) -> Iterator[tuple[Any, dict]]:
        keys = [name for name in self.info.features if name != BROKEN_COLUMN]
        media = [name for name, feature in self.info.features.items() if isinstance(feature, datasets.Image)]
        for tar_index, tar_path in enumerate(tar_paths):
            index, members, error = 0, TarMembers(tar_path), None
            try:
                for example in self._get_pipeline_from_tar(tar_path, members):
                    row = {name: example.get(name) for name in keys}
                    for name in media:
                        # No path: `datasets` would read a member's name as a file of the working directory when
                        # the member is empty.
                        if row[name] is not None:
                            row[name] = {"path": None, "bytes": row[name]}
                    yield (tar_index, index), {**row, BROKEN_COLUMN: None}
                    index += 1
            except (tarfile.TarError, OSError, EOFError) as raised:
                error = str(raised)
            if error or members.cut_short:
                broken = dict.fromkeys(keys)
                broken.update({"__key__": os.path.basename(tar_path), "__url__": tar_path})
                yield (tar_index, index), {**broken, BROKEN_COLUMN: f"{tar_path}: {error or members.cut_short}"}


class TarMembers:
    """The regular files of a tar, in order. Iterating raises `tarfile.ReadError` where a member's data is cut; an
    archive cut at a header or missing its end-of-archive blocks (where the stdlib reader in stream mode ends
    silently) ends the iteration normally, with `cut_short` saying so, so the samples read before it are kept."""

    def __init__(self, path: str):
        self.path = path
        self.cut_short: str | None = None

    def __iter__(self) -> Iterator[tuple[str, IO[bytes]]]:
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as file, tarfile.open(fileobj=file, mode="r|*") as stream:
            for member in stream:
                if member.isreg() and not os.path.basename(member.name).startswith((".", "__")):
                    handle = stream.extractfile(member)
                    assert handle is not None  # a regular file
                    yield member.name, handle
            # A complete archive ends with two zero blocks after its last member (checked where offsets are the
            # file's: an uncompressed tar).
            uncompressed = getattr(stream.fileobj, "comptype", "tar") == "tar"
            if uncompressed and size < stream.offset + 2 * TAR_BLOCK:
                self.cut_short = f"the archive ends at byte {size} without its end-of-archive blocks (cut short)"


def sample_level_webdataset(files: list[str], split: str) -> SampleLevelWebDataset:
    return SampleLevelWebDataset(data_files=DataFilesDict.from_patterns({split: files}))
