"""Captioned images from Debian icon themes: each icon is named by its concept (`document-print-preview`), and
several themes draw the same names in different styles.

The PNG themes are Adwaita (`adwaita-icon-theme`: full-colour icons, and recolourable `-symbolic` line icons, a
style of their own here), Tango (`tango-icon-theme`) and Oxygen (`oxygen-icon-theme`). A caption is the name's words
("document print preview") in a template ("an icon of document print preview."). Only regular files are read: the
themes' symbolic links give legacy alias names (`gtk-directory` → `folder`) to a drawing already read under its own
name. `find_icons` keeps one file per (style, name, size); `split_names` holds out whole concepts, so retrieval over
the held-out names measures whether a model generalises to names it never saw; `evaluation_icons` picks one image
per (style, name) for that retrieval.

Images are stored as the themes ship them (RGBA, LA or palette PNGs): the image processor composites transparency
onto white, in training and in evaluation alike.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from ..synthetic import write_webdataset_shard

ICONS = Path("/usr/share/icons")
# Theme folder under ICONS → style name (the Debian package that installs it).
THEMES = {
    "Adwaita": "Adwaita",  # adwaita-icon-theme
    "Tango": "Tango",  # tango-icon-theme
    "oxygen/base": "Oxygen",  # oxygen-icon-theme
}
SIZES = (16, 22, 24, 32, 48)
# The size of the one image per (style, name) that evaluation reads: the first of these the theme draws.
EVALUATION_SIZES = (32, 48, 24, 22, 16)
# Adwaita names its symbolic icons `<name>-symbolic.symbolic.png` (`<name>-symbolic-rtl.symbolic.png` mirrored);
# a `-symbolic` inside a name (`emblem-symbolic-link`) is a word of the concept.
SYMBOLIC_MARK = re.compile(r"-symbolic(?=(-rtl|-ltr)?$)")
TEMPLATES = [
    "an icon of {c}.",
    "a {c} icon.",
    "{c}",
    "the {c} symbol.",
    "a small icon of {c}.",
    "a desktop icon showing {c}.",
    "an icon for {c}.",
    "a pictogram of {c}.",
]


@dataclass(frozen=True)
class Icon:
    style: str
    name: str  # the concept, without a `-symbolic` suffix
    size: int
    path: Path


def concept_name(file_stem: str) -> tuple[str, bool]:
    """The icon name of a file stem without its symbolic marks (`edit-copy-symbolic.symbolic` → `edit-copy`,
    `mail-forward-symbolic-rtl.symbolic` → `mail-forward-rtl`), and whether it had one."""
    name = SYMBOLIC_MARK.sub("", file_stem.removesuffix(".symbolic"))
    return name, name != file_stem


def caption_text(name: str) -> str:
    """The words of an icon name: `document-print-preview` → "document print preview",
    `application-vnd.ms-excel` → "application vnd ms excel"."""
    words = re.split(r"[-_.+\s]+", name.lower())
    text = " ".join(word for word in words if word)
    if not text:
        raise ValueError(f"icon name {name!r} has no words to caption.")
    return text


def find_icons(root: Path = ICONS, themes: dict[str, str] = THEMES, sizes: Sequence[int] = SIZES) -> list[Icon]:
    """Every square PNG icon of `themes` (folder under `root` → style) at `sizes`, one per (style, name, size).

    Layout: `<theme>/<size>x<size>/<context>/<name>.png`. Symbolic links (alias names) and files whose pixel size is
    not the folder's are skipped; when a theme draws a name in two contexts, the first path in sorted order wins."""
    icons: dict[tuple[str, str, int], Icon] = {}
    for folder, style in themes.items():
        theme = root / folder
        if not theme.is_dir():
            raise FileNotFoundError(
                f"icon theme {theme} is not installed (apt-get install {style.lower()}-icon-theme)."
            )
        for size in sizes:
            for path in sorted((theme / f"{size}x{size}").glob("*/*.png")):
                if path.is_symlink():
                    continue
                name, symbolic = concept_name(path.stem)
                key = (f"{style} symbolic" if symbolic else style, name, size)
                if key in icons:
                    continue
                with PIL.Image.open(path) as image:
                    if image.size != (size, size):
                        continue
                icons[key] = Icon(key[0], name, size, path)
    if not icons:
        raise FileNotFoundError(f"no PNG icons under {root} for themes {sorted(themes)} at sizes {list(sizes)}.")
    return list(icons.values())


def split_names(names: Iterable[str], held_out_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """The distinct names split into (training, held-out), each sorted; `held_out_fraction` of them are held out,
    drawn at random with `seed`."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}.")
    distinct = sorted(set(names))
    num_held_out = round(held_out_fraction * len(distinct))
    if not 0 < num_held_out < len(distinct):
        raise ValueError(f"cannot hold out {held_out_fraction:.0%} of {len(distinct)} names and keep both sides.")
    held_out = {distinct[i] for i in np.random.default_rng(seed).permutation(len(distinct))[:num_held_out]}
    return [name for name in distinct if name not in held_out], sorted(held_out)


def evaluation_icons(icons: Iterable[Icon], sizes: Sequence[int] = EVALUATION_SIZES) -> list[Icon]:
    """One icon per (style, name): the one at the first of `sizes` the style draws it at; sorted by style, name."""
    rank = {size: index for index, size in enumerate(sizes)}
    chosen: dict[tuple[str, str], Icon] = {}
    for icon in icons:
        if icon.size not in rank:
            continue
        key = (icon.style, icon.name)
        if key not in chosen or rank[icon.size] < rank[chosen[key].size]:
            chosen[key] = icon
    return [chosen[key] for key in sorted(chosen)]


def write_icon_shards(
    icons: Sequence[Icon],
    folder: Path,
    prefix: str,
    num_shards: int,
    rng: np.random.Generator,
    templates: Sequence[str] = TEMPLATES,
) -> tuple[list[str], list[str]]:
    """Shuffled webdataset shards of `<key>.png` (the theme's file, unchanged) and `<key>.txt` (the name's words in a
    randomly chosen template); returns the shard paths and the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(icons))
    captions = [
        templates[int(rng.integers(len(templates)))].replace("{c}", caption_text(icons[i].name)) for i in order
    ]
    paths = []
    for shard, positions in enumerate(np.array_split(np.arange(len(order)), num_shards)):
        path = folder / f"{prefix}-{shard:03d}.tar"
        samples = (
            (
                f"{prefix}{order[position]:06d}",
                {"png": icons[order[position]].path.read_bytes(), "txt": captions[position].encode()},
            )
            for position in positions
        )
        write_webdataset_shard(path, samples)
        paths.append(str(path))
    return paths, captions
