"""A loopback stand-in for the Hub's write API, as much as `HfApi.create_repo` + `upload_folder` call.

Routes (huggingface_hub 1.x/2.x): `POST /api/repos/create`, `POST /api/validate-yaml`,
`POST /api/models/{repo}/preupload/{revision}` (every file "regular", so contents travel inside the commit) and
`POST /api/models/{repo}/commit/{revision}` (NDJSON: a header line, then one base64 "file" line per file).
Anything else answers 404, so a client calling a route this server does not know fails the test loudly.
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

import yaml

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
def fake_hub() -> Iterator[tuple[str, HubState]]:
    """Serve on 127.0.0.1 (a free port) in a thread; yields the endpoint URL and the recorded state."""
    state = HubState()
    base_url: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, base_url))
    base_url.append(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base_url[0], state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
