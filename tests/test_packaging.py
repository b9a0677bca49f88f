"""The wheel holds the whole library (training, evaluation, input pipeline, architectures, demo configs) and works
on its own: imported from an unpacked wheel, with the checkout nowhere on the path."""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder)]
    subprocess.run([*command, str(REPO)], check=True, capture_output=True, timeout=300)
    return next(folder.glob("hf_clip-*.whl"))


def test_wheel_holds_every_package_module_and_data_file_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    package_files = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "hf_clip").rglob("*")
        if path.is_file() and path.suffix in (".py", ".json", ".typed") and "__pycache__" not in path.parts
    }
    assert package_files <= names, sorted(package_files - names)
    assert sum(name.startswith("hf_clip/architectures/") and name.endswith(".json") for name in names) == 9
    assert not [name for name in names if name.split("/")[0] in ("examples", "conversion", "tests", "docs")]
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in (
        "hf-clip-train = hf_clip.training.loop:main",
        "hf-clip-eval = hf_clip.evaluation.runner:main",
        "hf-clip-demo = hf_clip.demo.fashion_mnist:main",
        "hf-clip-embed = hf_clip.embedding.job:main",
        "hf-clip-index = hf_clip.embedding.index:main",
        "hf-clip-search = hf_clip.embedding.search:main",
        "hf-clip-export-onnx = hf_clip.onnx.export:main",
        "hf-clip-wise-ft = hf_clip.wise_ft:main",
    ):
        assert script in scripts


def test_unpacked_wheel_imports_and_builds_a_published_architecture(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    check = textwrap.dedent(
        f"""
        import hf_clip, hf_clip.training, hf_clip.evaluation, hf_clip.data.streams, hf_clip.demo.fashion_mnist
        assert hf_clip.__file__.startswith({str(site)!r}), hf_clip.__file__
        from hf_clip import HfClipConfig
        from hf_clip.demo.fashion_mnist import DEFAULT_TRAIN_CONFIG
        from hf_clip.training import parse_config
        config = HfClipConfig.from_architecture("ViT-B-32")
        assert config.vision_config.patch_size == 32 and len(HfClipConfig.architecture_names()) == 9
        run = parse_config([str(DEFAULT_TRAIN_CONFIG)])
        assert run.model_config.startswith({str(site)!r}) and run.per_device_batch_size == 128
        """
    )
    # -P: the working directory (the checkout) is not put on sys.path; PYTHONPATH puts the unpacked wheel first.
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-P", "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
