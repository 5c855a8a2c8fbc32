"""Hub sources: a local HF cache layout with HF_HUB_OFFLINE=1, and a hub that says 401/403
(a real HTTP server on 127.0.0.1 given as the hub endpoint)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from fastapi.testclient import TestClient

from tests import checkpoints
from tests.conftest import ClientFactory, load

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, models_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    checkpoints.hub_cache_repo(cache, "acme/tiny-llama", models_root / "llama", COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_from_offline_cache(client: TestClient, hub_cache: Path) -> None:
    status = load(client, source="acme/tiny-llama", dtype="float32")
    assert status["state"] == "ready", status
    assert status["resolved_revision"] == COMMIT
    assert status["spec"]["revision"] == "main"
    assert status["architecture"] == "LlamaForCausalLM"


def test_hub_snapshot_files_are_served_through_their_blob_links(
    client: TestClient, hub_cache: Path
) -> None:
    status = load(client, source="acme/tiny-llama", dtype="float32")
    listed = client.get(f"/v1/models/{status['id']}/files").json()
    assert "config.json" in {f["name"] for f in listed["files"]}
    assert listed["revision"] == COMMIT
    got = client.get(f"/v1/models/{status['id']}/files/config.json")
    assert got.status_code == 200 and got.json()["model_type"] == "llama"
    # A link that leaves the repo's blobs is still refused.
    snapshot = hub_cache / "models--acme--tiny-llama" / "snapshots" / COMMIT
    (snapshot / "vocab.txt").symlink_to(hub_cache / "elsewhere.txt")
    (hub_cache / "elsewhere.txt").write_text("x\n")
    assert client.get(f"/v1/models/{status['id']}/files/vocab.txt").status_code == 404


def test_hub_id_not_cached_offline(client: TestClient, hub_cache: Path) -> None:
    status = load(client, source="acme/not-there")
    assert status["error"]["code"] == "source_not_found"
    assert "HF_HUB_OFFLINE" in status["error"]["message"]


def test_invalid_hub_id(client: TestClient) -> None:
    response = client.post("/v1/models", json={"source": "a/b/c"})
    assert response.status_code == 400 and response.json()["code"] == "invalid_spec"


class _Refusing(BaseHTTPRequestHandler):
    seen_auth: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).seen_auth.append(self.headers.get("Authorization", ""))
        gated = "gated" in self.path
        self.send_response(403 if gated else 401)
        self.send_header("Content-Type", "application/json")
        if gated:
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model acme/gated is restricted.")
        else:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()
        self.wfile.write(b'{"error": "nope"}')

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def refusing_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _Refusing.seen_auth = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("repo", ["acme/private", "acme/gated"])
def test_hub_refusal_says_pass_a_token(
    make_client: ClientFactory,
    refusing_hub: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    repo: str,
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    client = make_client(hf_endpoint=refusing_hub)
    secret = "hf_secret_token_never_echoed"
    with caplog.at_level(logging.DEBUG):
        response = client.post("/v1/models", json={"source": repo}, headers={"X-HF-Token": secret})
        from tests.conftest import wait_for

        status = wait_for(client, response.json()["id"])
    assert status["error"]["code"] == "gated_or_unauthorized", status
    assert "X-HF-Token" in status["error"]["message"]
    assert f"Bearer {secret}" in _Refusing.seen_auth  # the token did reach the hub
    everything = response.text + client.get("/v1/models").text + caplog.text
    assert secret not in everything


@pytest.mark.parametrize(
    "revision",
    ["../../../canary/config.json", "-main", "x.lock", "a\x00b"],
)
@pytest.mark.parametrize("path", ["/v1/models", "/v1/estimate"])
def test_a_revision_that_is_not_a_git_ref_answers_400(
    client: TestClient, revision: str, path: str
) -> None:
    response = client.post(path, json={"source": "acme/tiny-llama", "revision": revision})
    assert response.status_code == 400, response.text
    problem = response.json()
    assert problem["code"] == "invalid_spec" and "revision" in problem["detail"], problem
