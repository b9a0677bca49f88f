"""What a sample is, and the one place that decides whether an example of a stream is one: `SampleDecoder`.

Every reader (the training stream, the embedding job, the training loop's zero-shot evaluation) hands each example to
a `SampleDecoder`, which returns a `Sample` or counts one skip under one of `SKIP_REASONS` and names the sample in the
log (`SkipLog`). Nothing a single sample holds ends a stream:

- `broken_shard`: the marker of a file that could not be read to its end (`hf_clip.data.archives`);
- `missing_field`: no image, no caption or no label where one is needed;
- `bad_caption`: a caption that is not valid UTF-8 text;
- `empty_caption`: a caption of only whitespace;
- `bad_image`: an image that is empty (zero bytes), cannot be read or decoded, or that the image transform rejects.
"""

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import PIL.Image

from .archives import BROKEN_COLUMN

logger = logging.getLogger(__name__)

SKIP_REASONS = ("bad_image", "empty_caption", "missing_field", "broken_shard", "bad_caption")
MAX_NAMED_SKIPS = 20  # per worker and pass; later skips are logged at DEBUG level
ImageT = TypeVar("ImageT")


class SkippedSample(Exception):
    """A sample that cannot be used, with its `SKIP_REASONS` reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Sample(Generic[ImageT]):
    """One usable sample: its key (for logs and metadata), its image as the reader's `decode_image` made it (`None`
    when images are not read), its caption (stripped) and label where asked for."""

    key: str
    image: ImageT | None
    caption: str | None
    label: int | None


class SkipLog:
    """Counts skipped samples by reason and names the first `MAX_NAMED_SKIPS` of a worker's pass in the log (enough
    to find a bad shard or file); later ones go to DEBUG, and the counts travel with the data anyway."""

    def __init__(self, rank: int):
        self.rank = rank
        self.named = 0

    def restart(self) -> None:
        self.named = 0

    def skip(self, skipped: Counter[str], reason: str, key: str, detail: str) -> None:
        skipped[reason] += 1
        if reason == "broken_shard":  # always named: it costs the rest of a file
            logger.error("rank %d: data file %s broke (%s); the rest of it is skipped.", self.rank, key, detail)
            return
        self.named += 1
        level = logging.WARNING if self.named <= MAX_NAMED_SKIPS else logging.DEBUG
        logger.log(level, "rank %d: skipped sample %s (%s): %s", self.rank, key, reason, detail)


def image_bytes(value: Any) -> bytes | bytearray | None:
    """Encoded image bytes from a `{"bytes", "path"}` struct or raw bytes; `None` when absent. The path is read only
    when there are no bytes at all: a webdataset member's `path` is a name inside the archive, not a file."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            try:
                with open(value["path"], "rb") as file:
                    return file.read()
            except OSError as error:
                raise SkippedSample("bad_image", f"cannot read {value['path']} ({error.strerror})") from error
        return None
    return value if isinstance(value, (bytes, bytearray)) else None


def caption_text(value: Any) -> str:
    """The stripped caption of a str or UTF-8 bytes value; raises `SkippedSample` for a missing, undecodable or
    empty one."""
    if value is None:
        raise SkippedSample("missing_field", "no caption")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise SkippedSample("bad_caption", f"the caption is not UTF-8 text ({error})") from error
    if not isinstance(value, str):
        raise SkippedSample("bad_caption", f"the caption is a {type(value).__name__}, not text")
    if not value.strip():
        raise SkippedSample("empty_caption", "empty caption")
    return value.strip()


@dataclass
class SampleDecoder:
    """Turns examples of a stream into `Sample`s, skipping and counting the ones that are not (module docstring).

    `image_column` / `text_column` / `label_column`: where the example holds them (`None`: not read); with
    `caption_required`, a sample without a usable caption is skipped, else a caption is kept where present.
    """

    image_column: str | None
    text_column: str | None = None
    label_column: str | None = None
    caption_required: bool = True
    skip_log: SkipLog | None = None

    def __call__(
        self,
        example: dict[str, Any],
        skipped: Counter[str],
        decode_image: Callable[[bytes | bytearray, str], ImageT] | None = None,
        fallback_key: str = "?",
        where: str = "",
    ) -> Sample[ImageT] | None:
        """The sample, or `None` after counting its skip in `skipped`. `decode_image(data, key)` makes the image
        (it may raise `ValueError` / `OSError` for bad data); `where` follows the key in the log (e.g. the source)."""
        key = self.key(example, fallback_key)
        try:
            if example.get(BROKEN_COLUMN):
                raise SkippedSample("broken_shard", example[BROKEN_COLUMN])
            return self.decode(example, key, decode_image)
        except SkippedSample as skip:
            if self.skip_log is not None:
                self.skip_log.skip(skipped, skip.reason, key + where, str(skip))
            else:
                skipped[skip.reason] += 1
            return None

    def key(self, example: dict[str, Any], fallback: str) -> str:
        """The sample's name: the webdataset key (or a row's file and line), else the image's path, else `fallback`."""
        if example.get("__key__"):
            return str(example["__key__"])
        image = example.get(self.image_column) if self.image_column else None
        if isinstance(image, dict) and image.get("path"):
            return str(image["path"])
        return fallback

    def decode(
        self, example: dict[str, Any], key: str, decode_image: Callable[[bytes | bytearray, str], ImageT] | None
    ) -> Sample[ImageT]:
        caption = None
        if self.text_column is not None:
            value = example.get(self.text_column)
            if self.caption_required or value is not None:
                caption = caption_text(value)
        label = None
        if self.label_column is not None:
            label = example.get(self.label_column)
            if label is None:
                raise SkippedSample("missing_field", "no label")
            label = int(label)
        image = None
        if decode_image is not None:
            data = image_bytes(example.get(self.image_column)) if self.image_column else None
            if data is None:
                raise SkippedSample("missing_field", "no image")
            if not data:
                raise SkippedSample("bad_image", "the image file is empty (zero bytes)")
            try:
                image = decode_image(data, key)
            except (ValueError, OSError, PIL.Image.DecompressionBombError) as error:
                raise SkippedSample("bad_image", str(error)) from error
        return Sample(key, image, caption, label)
