"""The one guard against broken input files, for every reader of a stream.

A broken file shows up as one marker example whose `BROKEN_COLUMN` holds the file and the error, after the examples
read before the break: the webdataset reader writes it itself and goes on with its next shard
(`hf_clip.data.webdataset`); for the other formats `guarded` writes it when the stream raises (a damaged parquet
file), and the stream ends there (`datasets` cannot continue a stream that raised). The per-sample decoder
(`hf_clip.data.samples.SampleDecoder`) counts a marker as one `broken_shard`.
"""

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

BROKEN_COLUMN = "__broken__"


def is_broken(example: dict[str, Any]) -> bool:
    return bool(example.get(BROKEN_COLUMN))


def guarded(examples: Iterable[dict[str, Any]], files: list[str]) -> Iterator[dict[str, Any]]:
    """The examples of a stream; a stream that raises (tarfile.ReadError, OSError, pyarrow errors from a damaged
    file) ends with a marker naming the file it was reading (one of `files`, when the traceback shows which)."""
    iterator = iter(examples)
    while True:
        try:
            example = next(iterator)
        except StopIteration:
            return
        except Exception as error:
            path = broken_file(error, files)
            yield {BROKEN_COLUMN: f"{path or 'an unknown file'}: {error}", "__url__": path}
            return
        yield example


def broken_file(error: BaseException, files: list[str]) -> str | None:
    """The file (one of `files`, or a file inside one of them when it is a folder) that a stream was reading when it
    raised `error`; `None` if the traceback does not show it.

    `datasets`' readers hold the path of the file they read in a local variable, and the traceback keeps their frames
    (also those of the threads `interleave_datasets` reads its sources in), so the frames name the file."""
    traceback = error.__traceback__
    while traceback is not None:
        for value in traceback.tb_frame.f_locals.values():
            if isinstance(value, str) and value and holds(files, value):
                return value
        traceback = traceback.tb_next
    return None


def holds(files: list[str], path: str) -> bool:
    """Whether `path` is one of `files` or lies inside one of them (a folder)."""
    real = os.path.realpath(path)
    owners = (os.path.realpath(file) for file in files)
    return any(real == owner or real.startswith(owner + os.sep) for owner in owners)
