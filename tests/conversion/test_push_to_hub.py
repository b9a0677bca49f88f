"""Publishing: one folder (model + processor + card), checked in clean processes, uploaded with `upload_folder` to a
loopback stand-in for the Hub reached through `HF_ENDPOINT`.

The stand-in implements as much of the Hub's write API as `HfApi.create_repo` + `upload_folder` call
(huggingface_hub 1.x/2.x): `POST /api/repos/create`, `POST /api/validate-yaml`,
`POST /api/models/{repo}/preupload/{revision}` (every file "regular", so contents travel inside the commit) and
`POST /api/models/{repo}/commit/{revision}` (NDJSON: a header line, then one base64 "file" line per file).
Anything else answers 404, so a client calling a route it does not know fails the test loudly.
"""

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from huggingface_hub import constants, metadata_load

from conversion.model_card import CardFacts, render_model_card
from conversion.push_to_hub import folder_files, main, publish, save_folder, upload
from conversion.testing_utils import tiny_model_for, tiny_processor
from hf_clip import HfClipModel

PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<revision>[^/?]+)")
COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<revision>[^/?]+)")


@dataclass
class HubState:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    validated_yaml: list[str] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    commit_headers: list[dict] = field(default_factory=list)


def _front_matter(content: str) -> object:
    match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.DOTALL)
    return yaml.safe_load(match.group(1)) if match else None


def _handler(state: HubState, base_url: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            return

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            state.requests.append(("GET", self.path))
            self._reply(404, {"error": f"fake hub: no GET route {self.path}"})

        def do_POST(self) -> None:
            state.requests.append(("POST", self.path))
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request['organization']}/{request['name']}"
                existed = repo_id in state.repos
                state.repos.setdefault(repo_id, {})
                if existed:
                    self._reply(
                        409, {"error": "You already created this model repo", "url": f"{base_url[0]}/{repo_id}"}
                    )
                else:
                    self._reply(200, {"url": f"{base_url[0]}/{repo_id}", "name": repo_id})
            elif path == "/api/validate-yaml":
                content = json.loads(body)["content"]
                state.validated_yaml.append(content)
                try:
                    metadata = _front_matter(content)
                except yaml.YAMLError as error:
                    self._reply(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
                    return
                if not isinstance(metadata, dict):
                    self._reply(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
                    return
                self._reply(200, {"errors": [], "warnings": []})
            elif match := PREUPLOAD.match(path):
                if match["repo"] not in state.repos:
                    self._reply(404, {"error": "Repository not found"})
                    return
                files = json.loads(body)["files"]
                self._reply(
                    200,
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                )
            elif match := COMMIT.match(path):
                if match["repo"] not in state.repos:
                    self._reply(404, {"error": "Repository not found"})
                    return
                repo = state.repos[match["repo"]]
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        state.commit_headers.append(item["value"])
                    elif item["key"] == "file":
                        repo[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    else:
                        self._reply(400, {"error": f"fake hub: unsupported commit entry {item['key']}"})
                        return
                oid = hashlib.sha1(body).hexdigest()
                self._reply(200, {"commitUrl": f"{base_url[0]}/{match['repo']}/commit/{oid}", "commitOid": oid})
            else:
                self._reply(404, {"error": f"fake hub: no POST route {path}"})

    return Handler


@contextmanager
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubState]:
    """Serve the stand-in on 127.0.0.1 (a free port) in a thread and point huggingface_hub at it (its constants are
    read at import, so they are patched too); yields what the server records."""
    state = HubState()
    base_url: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, base_url))
    base_url.append(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", base_url[0])
    monkeypatch.setattr(constants, "ENDPOINT", base_url[0])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_loopback_test")
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def hub(monkeypatch):
    with fake_hub(monkeypatch) as state:
        yield state


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
    model, processor = model_and_processor
    save_folder(model, processor, tmp_path)
    assert upload(tmp_path, "org/tiny", push=False) == folder_files(tmp_path)
    assert "dry run" in capsys.readouterr().out
    assert hub.requests == []


def test_upload_sends_exactly_the_folder_readme_included(hub, model_and_processor, tmp_path):
    model, processor = model_and_processor
    card = render_model_card(model, processor, CardFacts(source="a test", license="mit"), repo_id="org/tiny")
    save_folder(model, processor, tmp_path, card)
    upload(tmp_path, "org/tiny", push=True)
    _assert_arrived_intact(tmp_path, hub, "org/tiny")
    # The server validated the custom card's YAML, and kept it (model.push_to_hub would have replaced it).
    assert hub.validated_yaml == [(tmp_path / "README.md").read_text()]
    assert metadata_load(tmp_path / "README.md")["pipeline_tag"] == "zero-shot-image-classification"
    assert [header["summary"] for header in hub.commit_headers] == ["Upload hf_clip checkpoint"]
    paths = [path for method, path in hub.requests if method == "POST"]
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
    with pytest.MonkeyPatch.context() as monkeypatch, fake_hub(monkeypatch) as state:
        facts = CardFacts(source="a test", license="mit")
        published = publish(model, processor, folder, facts, repo_id="org/tiny-remote", push=True, remote_code=True)
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
    _, published, _ = published_remote_code
    main([str(published.folder), "--repo-id", "org/from-cli", "--push"])
    _assert_arrived_intact(published.folder, hub, "org/from-cli")
