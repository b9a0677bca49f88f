"""Synthetic inputs with the shapes of real ones: token batches as the tokenizer writes them, and photo-like JPEGs.

One place for the inputs that parity checks, benchmarks, device checks and tests feed to the model and to the image
pipeline. Nothing here is used by the model itself.
"""

import io
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

# Aspect ratios of the generated "web" photographs.
PHOTO_ASPECTS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9)


def random_captions(
    batch_size: int,
    seq_len: int,
    bos_token_id: int,
    eos_token_id: int,
    lengths: Sequence[int] | torch.Tensor | None = None,
    min_length: int = 2,
    max_length: int | None = None,
    include_longest: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`, both `(batch_size, seq_len)`, shaped like right-padded tokenizer output.

    Each row is BOS, random ids in `[1, min(bos, eos))`, EOS, then zero padding (OpenAI's padding id). Ids stay
    below BOS and EOS, so OpenAI's pooling (at the highest id) and hf_clip's (at the first EOS) pick the same
    position, as they do for real text where EOS is the last vocabulary entry. Caption lengths (BOS and EOS
    included) are `lengths` when given, else uniform in `[min_length, max_length]` (default `seq_len`);
    `include_longest` gives row 0 the length `max_length`, so every batch spans the whole range.
    """
    max_length = seq_len if max_length is None else max_length
    if not 2 <= min_length <= max_length <= seq_len:
        raise ValueError(
            f"caption lengths need 2 <= min_length ({min_length}) <= max_length ({max_length}) <= seq_len "
            f"({seq_len}): BOS and EOS take two tokens."
        )
    if lengths is None:
        drawn = torch.randint(min_length, max_length + 1, (batch_size,), generator=generator)
        if include_longest:
            drawn[0] = max_length
    else:
        drawn = torch.as_tensor(lengths, dtype=torch.long)
        if drawn.shape != (batch_size,) or int(drawn.min()) < 2 or int(drawn.max()) > seq_len:
            raise ValueError(f"lengths must be {batch_size} values in [2, {seq_len}], got {drawn.tolist()}.")
    input_ids = torch.randint(1, min(bos_token_id, eos_token_id), (batch_size, seq_len), generator=generator)
    input_ids[:, 0] = bos_token_id
    positions = torch.arange(seq_len)[None]
    ends = drawn[:, None] - 1
    input_ids = torch.where(positions == ends, eos_token_id, input_ids)
    input_ids = torch.where(positions > ends, 0, input_ids)
    attention_mask = (positions <= ends).long()
    return input_ids.to(device), attention_mask.to(device)


def photo_like(width: int, height: int, rng: np.random.Generator) -> PIL.Image.Image:
    """A synthetic photograph: 1/f-weighted smooth colour noise, a lighting gradient, flat shapes and sensor grain.

    JPEG-compresses and resizes like a photograph (smooth regions, edges, fine texture), unlike uniform noise."""
    image: np.ndarray = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((2, 1.0), (4, 0.6), (8, 0.35), (16, 0.2), (48, 0.12), (128, 0.06)):
        grid = (rng.random((cells, max(2, cells * width // height), 3)) * 255).astype(np.uint8)
        layer = PIL.Image.fromarray(grid).resize((width, height), PIL.Image.Resampling.BICUBIC)
        image += weight * (np.asarray(layer, np.float32) - 127.5)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.random() * 2 * np.pi
    image += (np.cos(angle) * cols / width + np.sin(angle) * rows / height)[..., None] * rng.normal(0, 60, 3)
    image = image * 0.8 + 127.5 + rng.normal(0, 4, image.shape)
    picture = PIL.Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(picture)
    for _ in range(int(rng.integers(3, 9))):
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (left, top, left + int(rng.integers(10, width // 2)), top + int(rng.integers(10, height // 2)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return picture


def write_webdataset_shard(path: str | Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> None:
    """A webdataset tar shard: for each `(key, {extension: content})`, one member `<key>.<extension>` per field."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for extension, content in fields.items():
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(content)
                tar.addfile(member, io.BytesIO(content))


def jpeg_bytes(image: PIL.Image.Image, quality: int = 90, exif: PIL.Image.Exif | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **({"exif": exif.tobytes()} if exif is not None else {}))
    return buffer.getvalue()


def web_photo_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of a web image: long side 375-1024 px, a common aspect ratio, 70 % landscape."""
    long_side = int(rng.integers(375, 1025))
    short_side = max(64, int(long_side / PHOTO_ASPECTS[int(rng.integers(len(PHOTO_ASPECTS)))]))
    return (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)


def photo_jpegs(count: int, seed: int = 0) -> dict[str, list[bytes]]:
    """`count` web-size JPEGs (quality 90) and the same pictures re-encoded with a 256-px shortest side."""
    rng = np.random.default_rng(seed)
    web, shards = [], []
    for _ in range(count):
        picture = photo_like(*web_photo_size(rng), rng)
        web.append(jpeg_bytes(picture))
        scale = 256 / min(picture.size)
        small = picture.resize(
            (round(picture.width * scale), round(picture.height * scale)), PIL.Image.Resampling.BICUBIC
        )
        shards.append(jpeg_bytes(small))
    return {"web sizes (375-1024 px)": web, "pre-resized (256-px shortest side)": shards}
