"""hf_clip.demo.icons, the data builders of the fine-tuning study (examples/finetune_study.py): captions from icon
names, the theme walk on a small fake icon tree (symbolic style, aliases, duplicates, wrong sizes), the split by
concept, the evaluation pick and the webdataset shards the training loop reads."""

import io
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from hf_clip import HfClipImageProcessor
from hf_clip.data.formats import DataSpec, load_stream
from hf_clip.demo.icons import (
    TEMPLATES,
    caption_text,
    concept_name,
    evaluation_icons,
    find_icons,
    split_names,
    write_icon_shards,
)


def test_captions_from_icon_names():
    assert caption_text("document-print-preview") == "document print preview"
    assert caption_text("application-vnd.ms-excel") == "application vnd ms excel"
    assert caption_text("Folder_Home") == "folder home"
    assert concept_name("edit-copy-symbolic.symbolic") == ("edit-copy", True)
    assert concept_name("mail-forward-symbolic-rtl.symbolic") == ("mail-forward-rtl", True)
    assert concept_name("edit-copy") == ("edit-copy", False)
    # A word of the concept, not a style mark.
    assert concept_name("emblem-symbolic-link") == ("emblem-symbolic-link", False)
    with pytest.raises(ValueError, match="no words"):
        caption_text("--")


def draw(path: Path, size: tuple[int, int], color: tuple[int, int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGBA", size, color).save(path)


@pytest.fixture
def icon_tree(tmp_path: Path) -> Path:
    root = tmp_path / "icons"
    draw(root / "A/16x16/actions/edit-copy.png", (16, 16), (255, 0, 0, 255))
    draw(root / "A/16x16/places/edit-copy.png", (16, 16), (0, 255, 0, 255))  # the same name in a later context
    draw(root / "A/16x16/actions/edit-copy-symbolic.symbolic.png", (16, 16), (40, 40, 40, 128))
    draw(root / "A/16x16/apps/banner.png", (16, 32), (0, 0, 255, 255))  # not the folder's size
    draw(root / "A/32x32/actions/edit-copy.png", (32, 32), (255, 0, 0, 255))
    draw(root / "A/32x32/status/weather-snow.png", (32, 32), (200, 200, 255, 255))
    draw(root / "B/base/16x16/actions/edit-copy.png", (16, 16), (9, 9, 9, 255))
    (root / "A/16x16/actions/gtk-copy.png").symlink_to("edit-copy.png")  # a legacy alias
    return root


def test_find_icons_walks_themes_by_style_name_and_size(icon_tree: Path):
    found = find_icons(icon_tree, {"A": "Alpha", "B/base": "Beta"}, sizes=(16, 32))
    keys = sorted((icon.style, icon.name, icon.size) for icon in found)
    assert keys == [
        ("Alpha", "edit-copy", 16),
        ("Alpha", "edit-copy", 32),
        ("Alpha", "weather-snow", 32),
        ("Alpha symbolic", "edit-copy", 16),
        ("Beta", "edit-copy", 16),
    ]
    first = next(icon for icon in found if (icon.style, icon.size) == ("Alpha", 16))
    assert first.path == icon_tree / "A/16x16/actions/edit-copy.png"
    assert [icon.size for icon in find_icons(icon_tree, {"A": "Alpha"}, sizes=(32,))] == [32, 32]
    with pytest.raises(FileNotFoundError, match="not installed"):
        find_icons(icon_tree, {"C": "Gamma"})


def test_evaluation_icons_pick_one_size_per_style_and_name(icon_tree: Path):
    found = find_icons(icon_tree, {"A": "Alpha", "B/base": "Beta"}, sizes=(16, 32))
    picked = [(icon.style, icon.name, icon.size) for icon in evaluation_icons(found, sizes=(32, 16))]
    assert picked == [
        ("Alpha", "edit-copy", 32),
        ("Alpha", "weather-snow", 32),
        ("Alpha symbolic", "edit-copy", 16),
        ("Beta", "edit-copy", 16),
    ]


def test_split_names_by_concept():
    names = [f"name-{i}" for i in range(50)] * 3  # each name drawn by three themes
    train, held_out = split_names(names, 0.2, seed=0)
    assert len(held_out) == 10 and len(train) == 40
    assert not set(train) & set(held_out) and set(train) | set(held_out) == set(names)
    assert (train, held_out) == split_names(reversed(names), 0.2, seed=0)  # depends on the names, not their order
    assert held_out != split_names(names, 0.2, seed=1)[1]
    for fraction in (0.0, 1.0, 0.001):
        with pytest.raises(ValueError):
            split_names(names, fraction, seed=0)


def test_icon_shards_hold_each_icon_once_with_a_caption_the_stream_reads(icon_tree: Path, tmp_path: Path):
    found = find_icons(icon_tree, {"A": "Alpha", "B/base": "Beta"}, sizes=(16, 32))
    paths, captions = write_icon_shards(found, tmp_path / "shards", "icons", 2, np.random.default_rng(0))
    assert len(paths) == 2 and len(captions) == len(found)
    samples: dict[str, dict[str, bytes]] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                file = tar.extractfile(member)
                assert file is not None
                samples.setdefault(key, {})[extension] = file.read()
    assert len(samples) == len(found)
    by_bytes = {icon.path.read_bytes(): icon for icon in found}
    assert len(by_bytes) == len(found)  # every fake icon differs, so the bytes name it
    written = []
    for fields in samples.values():
        icon = by_bytes[fields["png"]]
        caption = fields["txt"].decode()
        assert caption in {template.replace("{c}", caption_text(icon.name)) for template in TEMPLATES}
        written.append(caption)
    assert sorted(written) == sorted(captions)

    # The training loop's reader decodes them, transparency and all, into the processor's pixels.
    rows = list(load_stream(DataSpec("webdataset", paths, "png", "txt")))
    assert sorted(row["txt"].decode() for row in rows) == sorted(captions)  # captions stay bytes until decoded
    processor = HfClipImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = [PIL.Image.open(io.BytesIO(row["png"]["bytes"])) for row in rows]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (len(found), 3, 32, 32) and torch.isfinite(pixels).all()
