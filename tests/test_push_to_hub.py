"""Publishing: one folder (model + processor + card), checked in clean processes, uploaded with `upload_folder` to a
loopback stand-in for the Hub (`tests/fake_hub.py`) reached through `HF_ENDPOINT`."""

import json

import pytest
from conversion_helpers import tiny_model_for, tiny_processor
from fake_hub import fake_hub
from huggingface_hub import constants, metadata_load

from conversion.model_card import render_model_card
from conversion.push_to_hub import folder_files, main, publish, save_folder, upload
from hf_clip import HfClipModel


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub, with huggingface_hub pointed at it (its constants are read at import, so they are patched)."""
    with fake_hub() as (endpoint, state):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_loopback_test")
        yield endpoint, state


@pytest.fixture(scope="module")
def model_and_processor():
    processor = tiny_processor(image_size=32)
    return tiny_model_for(processor), processor


def _assert_arrived_intact(folder, state, repo_id):
    local = folder_files(folder)
    assert "README.md" in local and "model.safetensors" in local
    assert sorted(state.repos[repo_id]) == local
    for name in local:
        assert state.repos[repo_id][name] == (folder / name).read_bytes(), name


def test_dry_run_lists_files_and_contacts_nobody(hub, model_and_processor, tmp_path, capsys):
    _, state = hub
    model, processor = model_and_processor
    save_folder(model, processor, tmp_path)
    assert upload(tmp_path, "org/tiny", push=False) == folder_files(tmp_path)
    assert "dry run" in capsys.readouterr().out
    assert state.requests == []


def test_upload_sends_exactly_the_folder_readme_included(hub, model_and_processor, tmp_path):
    _, state = hub
    model, processor = model_and_processor
    card = render_model_card(model, processor, model_name="tiny", repo_id="org/tiny", license="mit", source="a test")
    save_folder(model, processor, tmp_path, card)
    upload(tmp_path, "org/tiny", push=True)
    _assert_arrived_intact(tmp_path, state, "org/tiny")
    # The server validated the custom card's YAML, and kept it (model.push_to_hub would have replaced it).
    assert state.validated_yaml == [(tmp_path / "README.md").read_text()]
    assert metadata_load(tmp_path / "README.md")["pipeline_tag"] == "zero-shot-image-classification"
    paths = [path for method, path in state.requests if method == "POST"]
    assert paths == [
        "/api/repos/create",
        "/api/validate-yaml",
        "/api/models/org/tiny/preupload/main",
        "/api/models/org/tiny/commit/main",
    ]


@pytest.fixture(scope="module")
def published_remote_code(tmp_path_factory):
    """One remote-code publish (two clean-process checks) shared by the tests below."""
    processor = tiny_processor(image_size=32)
    model = tiny_model_for(processor)
    folder = tmp_path_factory.mktemp("remote") / "tiny-remote"
    with pytest.MonkeyPatch.context() as monkeypatch, fake_hub() as (endpoint, state):
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_loopback_test")
        published = publish(
            model,
            processor,
            folder,
            source="a test",
            license="mit",
            repo_id="org/tiny-remote",
            push=True,
            remote_code=True,
        )
    return model, published, state


def test_remote_code_folder_loads_without_hf_clip(published_remote_code):
    _, published, _ = published_remote_code
    report = published.load_reports["remote_code"]
    # Loaded from the copied code (transformers_modules), in a process where `import hf_clip` fails.
    for loader in ("AutoModel", "AutoModelForZeroShotImageClassification"):
        assert report["classes"][loader].startswith("transformers_modules.")
        assert report["classes"][loader].endswith("modeling_hf_clip.HfClipModel")
        assert max(report["max_differences"][loader].values()) <= 1e-5
    assert report["classes"]["AutoProcessor"] == "HfClipProcessor"
    assert report["classes"]["tokenizer"] == "HfClipTokenizer"
    assert report["classes"]["image_processor"] == "HfClipImageProcessor"
    assert report["classes"]["pipeline_model"] == "HfClipModel" and len(report["pipeline_scores"]) == 3
    assert published.load_reports["hf_clip"]["classes"]["AutoModel"] == "hf_clip.modeling_hf_clip.HfClipModel"


def test_remote_code_folder_has_code_and_auto_map(published_remote_code):
    _, published, _ = published_remote_code
    config = json.loads((published.folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hf_clip.HfClipConfig",
        "AutoModel": "modeling_hf_clip.HfClipModel",
        "AutoModelForZeroShotImageClassification": "modeling_hf_clip.HfClipModel",
    }
    for module in ("configuration_hf_clip", "modeling_hf_clip", "modeling_layers", "modeling_vit", "modeling_text"):
        assert (published.folder / f"{module}.py").is_file(), module


def test_remote_code_registration_is_undone(published_remote_code, tmp_path):
    model, _, _ = published_remote_code
    assert "auto_map" not in vars(model.config) and HfClipModel._auto_class is None
    save_folder(model, tiny_processor(image_size=32), tmp_path)
    assert not list(tmp_path.glob("*.py")) and "auto_map" not in json.loads((tmp_path / "config.json").read_text())


def test_published_folder_arrives_intact(published_remote_code):
    _, published, state = published_remote_code
    _assert_arrived_intact(published.folder, state, "org/tiny-remote")
    assert published.files == folder_files(published.folder)


def test_cli_checks_then_uploads(hub, published_remote_code):
    _, state = hub
    _, published, _ = published_remote_code
    main([str(published.folder), "--repo-id", "org/from-cli", "--push"])
    _assert_arrived_intact(published.folder, state, "org/from-cli")
