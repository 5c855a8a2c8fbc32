"""Hub loads against a local stand-in hub (`tests.hub.LocalHub`, real HTTP on 127.0.0.1)
downloaded by the real huggingface_hub: admission before any weight byte, the disk
checked, progress in bytes, cancel, resume after a SIGKILL, retries, gated repos."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.common.disk import free_bytes
from tests.conftest import ClientFactory, until, wait_for
from tests.hub import LocalHub
from tests.serving.state.test_restart import env_for
from tests.serving.test_server_e2e import sse, start

WEIGHTS = "model.safetensors"
HEADER_READ = 100_001  # huggingface_hub's get_safetensors_metadata reads bytes 0-100000
CHUNK = 10 * 1024 * 1024  # huggingface_hub writes downloads in chunks of this size


@pytest.fixture
def hub_client(make_client: ClientFactory, hub: LocalHub) -> TestClient:
    return make_client(hf_endpoint=hub.url, download_retries=2, download_backoff_seconds=0.2)


def weight_reads(hub: LocalHub, repo: str) -> list[str | None]:
    """The Range header of every GET of `repo`'s weights (None: the whole file)."""
    sha = hub.repos[repo].files[WEIGHTS].sha256
    return [r.range for r in hub.requests if r.method == "GET" and r.path == f"/lfs/{sha}"]


def blobs(tmp_path: Path, repo: str) -> list[Path]:
    folder = tmp_path / "hf-cache" / f"models--{repo.replace('/', '--')}" / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def open_under(folder: Path) -> list[str]:
    """Files under `folder` that some process holds open (its /proc/*/fd links)."""
    prefix = f"{folder.resolve()}/"
    found = []
    for link in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(link)
        except OSError:
            continue  # the process or fd went away meanwhile
        if target.startswith(prefix):
            found.append(target)
    return found


def stopped(hub: LocalHub, cache: Path, repo: str) -> None:
    """Until no process holds a file of `repo`'s cache open (its loader is gone) and the hub
    sends no body any more (its writes to the closed connections failed)."""
    blobs = cache / f"models--{repo.replace('/', '--')}" / "blobs"
    until(lambda: not open_under(blobs), f"the download of {repo} stopped", 30)
    until(lambda: hub.streaming == 0, "the hub's responses ended", 30)


def downloading_events(url: str, model_id: str, at_least: int) -> list[dict[str, Any]]:
    """Progress events of `model_id` in phase `downloading` (from /v1/events), until one
    counts `at_least` bytes done."""
    seen: list[dict[str, Any]] = []
    for kind, event in sse(url, timeout=60):
        if kind != "progress" or event["id"] != model_id:
            continue
        if event["progress"]["phase"] == "downloading":
            seen.append(event["progress"])
            if seen[-1]["bytes_done"] >= at_least:
                return seen
    raise AssertionError(f"the events ended before {at_least} bytes: {seen}")


def test_a_hub_load_names_its_commit_and_counts_download_bytes(
    hub_client: TestClient, hub: LocalHub
) -> None:
    repo = hub.repos["acme/bigger"]
    total = sum(f.size for f in repo.files.values())
    hub.faults.rate = total / 3  # about 3 s of download to watch
    response = hub_client.post("/v1/models", json={"source": "acme/bigger", "dtype": "float32"})
    assert response.status_code == 202, response.text
    model_id = response.json()["id"]
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = hub_client.get(f"/v1/models/{model_id}").json()
        if status["progress"]["phase"] == "downloading":
            seen.append(status["progress"])
        if status["state"] in ("ready", "failed"):
            break
        time.sleep(0.05)
    assert status["state"] == "ready", status
    done = [p["bytes_done"] for p in seen]
    assert len(set(done)) >= 3, seen  # bytes grow while the files come in
    assert done == sorted(done)
    # Every file, not one at a time (config.json came with admission, before the download).
    assert {p["bytes_total"] for p in seen} == {total - repo.files["config.json"].size}
    assert status["resolved_revision"] == repo.commit
    assert status["spec"]["revision"] == "main"
    lease = hub_client.post(f"/v1/models/{model_id}/leases", json={"holder": "t"}).json()
    assert lease["handle"]["provenance"] == {
        "source": "acme/bigger",
        "hub_id": "acme/bigger",
        "revision": repo.commit,
    }
    assert hub.bytes_served("acme/bigger", WEIGHTS) == HEADER_READ + repo.files[WEIGHTS].size
    # The file list came with the commit: snapshot_download found it in huggingface_hub's
    # tree cache and listed nothing (its tree listing has no timeout).
    assert not [r.path for r in hub.requests if "/tree/" in r.path]


def test_a_load_that_cannot_fit_answers_507_before_any_weight_byte(
    make_client: ClientFactory, hub: LocalHub, tmp_path: Path
) -> None:
    client = make_client(hf_endpoint=hub.url, host_memory_budget="300KB", memory_headroom="0")
    estimate = client.post("/v1/estimate", json={"source": "acme/llama", "dtype": "float32"})
    assert estimate.status_code == 200 and estimate.json()["fits"] is False, estimate.text
    assert weight_reads(hub, "acme/llama") == []  # an estimate reads config.json only
    # ... and says what the load would download: every file but config.json (fetched).
    files = hub.repos["acme/llama"].files
    assert estimate.json()["download_bytes"] == sum(
        f.size for name, f in files.items() if name != "config.json"
    )
    response = client.post("/v1/models", json={"source": "acme/llama", "dtype": "float32"})
    assert response.status_code == 507, response.text
    assert response.json()["code"] == "insufficient_memory"
    # Only the safetensors header was read (huggingface_hub's ranged read), never the file.
    assert weight_reads(hub, "acme/llama") == ["bytes=0-100000"]
    size = hub.repos["acme/llama"].files[WEIGHTS].size
    assert hub.bytes_served("acme/llama", WEIGHTS) == HEADER_READ < size
    assert not [b for b in blobs(tmp_path, "acme/llama") if b.stat().st_size == size]
    assert client.get("/v1/models").json()["models"] == []


def test_a_download_the_disk_cannot_take_answers_507_insufficient_storage(
    hub_client: TestClient, hub: LocalHub, models_root: Path, tmp_path: Path
) -> None:
    hub.add("acme/huge", models_root / "llama", claimed={WEIGHTS: 1 << 50})  # 1 PiB
    response = hub_client.post("/v1/models", json={"source": "acme/huge", "dtype": "float32"})
    assert response.status_code == 507, response.text
    problem = response.json()
    assert problem["code"] == "insufficient_storage"
    needed, free = map(int, re.findall(r"(\d+) bytes", problem["detail"]))
    assert needed == (1 << 50) + hub.repos["acme/huge"].files["generation_config.json"].size
    assert 0 < free < needed and f"HF cache {tmp_path / 'hf-cache'}," in problem["detail"]
    assert weight_reads(hub, "acme/huge") == ["bytes=0-100000"]


def test_downloads_in_flight_count_against_the_disk(
    hub_client: TestClient, hub: LocalHub, models_root: Path, tmp_path: Path
) -> None:
    """Two downloads that each fit the cache's disk but not together: the second answers
    507 while the first is in flight, and is admitted once it is gone. Another load of the
    same snapshot shares its download."""
    share = int(free_bytes(tmp_path / "hf-cache") * 0.6)
    hub.add("acme/first", models_root / "llama", claimed={WEIGHTS: share})
    hub.add("acme/second", models_root / "llama", claimed={WEIGHTS: share})
    hub.faults.rate = 20_000  # the first stays in flight

    def post(source: str, dtype: str = "float32") -> tuple[int, dict[str, Any]]:
        response = hub_client.post("/v1/models", json={"source": source, "dtype": dtype})
        return response.status_code, response.json()

    def gone(model_id: str) -> None:
        hub_client.delete(f"/v1/models/{model_id}")
        until(lambda: hub_client.get(f"/v1/models/{model_id}").status_code == 404, "gone")

    status, first = post("acme/first")
    assert status == 202, first
    status, refused = post("acme/second")
    assert status == 507 and refused["code"] == "insufficient_storage", refused
    assert "to be written by downloads in flight" in refused["detail"]
    status, same_files = post("acme/first", dtype="float16")
    assert status == 202, same_files
    gone(first["id"])
    gone(same_files["id"])
    status, again = post("acme/second")
    assert status == 202, again
    gone(again["id"])


def test_delete_mid_download_stops_it_within_two_seconds(
    hub_client: TestClient, hub: LocalHub, tmp_path: Path
) -> None:
    hub.faults.rate = 50_000  # 0.9 MB of weights: ~17 s
    model_id = hub_client.post("/v1/models", json={"source": "acme/llama"}).json()["id"]

    def downloading_weights() -> bool:  # huggingface_hub holds the weights' partial file open
        return any(target.endswith(".incomplete") for target in open_under(tmp_path / "hf-cache"))

    until(downloading_weights, "the weights' download started")
    began = time.monotonic()
    response = hub_client.delete(f"/v1/models/{model_id}")
    assert response.status_code in (202, 204), response.text
    until(lambda: hub_client.get(f"/v1/models/{model_id}").status_code == 404, "gone", 10)
    until(lambda: not open_under(tmp_path / "hf-cache"), "the loader is gone", 10)
    assert time.monotonic() - began < 2
    served = hub.bytes_served("acme/llama")
    until(lambda: hub.streaming == 0, "the hub's response ended", 30)
    # Nothing more was fetched: at most the chunks the hub wrote before it saw the close.
    assert hub.bytes_served("acme/llama") - served <= 2 * 64 * 1024


def test_a_cut_mid_file_is_resumed_not_restarted(hub_client: TestClient, hub: LocalHub) -> None:
    size = hub.repos["acme/bigger"].files[WEIGHTS].size
    cut = size * 3 // 4
    hub.faults.fail_after[WEIGHTS] = cut
    hub.faults.fail_times[WEIGHTS] = 1
    response = hub_client.post("/v1/models", json={"source": "acme/bigger"})
    status = wait_for(hub_client, response.json()["id"])
    assert status["state"] == "ready", status
    reads = weight_reads(hub, "acme/bigger")
    assert reads[:2] == ["bytes=0-100000", None] and len(reads) == 3, reads
    # huggingface_hub resumes from the last whole 10 MiB chunk it wrote, not from zero.
    resumed_at = int(str(reads[2]).removeprefix("bytes=").removesuffix("-"))
    assert resumed_at == cut // CHUNK * CHUNK > 0, reads
    assert hub.bytes_served("acme/bigger", WEIGHTS) == HEADER_READ + cut + size - resumed_at


def test_a_hub_that_keeps_failing_ends_download_failed(
    hub_client: TestClient, hub: LocalHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub.faults.unavailable.add(WEIGHTS)
    response = hub_client.post("/v1/models", json={"source": "acme/llama"})
    status = wait_for(hub_client, response.json()["id"])
    assert status["state"] == "failed"
    assert status["error"]["code"] == "download_failed", status
    assert "3 times" in status["error"]["message"] and "load it again" in status["error"]["message"]
    assert weight_reads(hub, "acme/llama").count(None) == 3  # the first try and 2 retries
    hub.faults.unavailable.clear()  # the hub is back: the same request loads
    again = hub_client.post("/v1/models", json={"source": "acme/llama"}).json()["id"]
    assert wait_for(hub_client, again)["state"] == "ready"


def test_a_gated_repo_without_a_token_fails_before_any_download(
    hub_client: TestClient, hub: LocalHub, models_root: Path
) -> None:
    hub.add("acme/gated", models_root / "llama", gated=True, token="hf_good_token")
    model_id = hub_client.post("/v1/models", json={"source": "acme/gated"}).json()["id"]
    status = wait_for(hub_client, model_id)
    assert status["error"]["code"] == "gated_or_unauthorized", status
    assert "X-HF-Token" in status["error"]["message"]
    assert hub.bytes_served("acme/gated") == 0
    response = hub_client.post(
        "/v1/models", json={"source": "acme/gated"}, headers={"X-HF-Token": "hf_good_token"}
    )
    assert wait_for(hub_client, response.json()["id"])["state"] == "ready"


@pytest.mark.e2e
def test_a_restart_mid_download_resumes_where_the_files_stopped(
    tmp_path: Path, hub: LocalHub
) -> None:
    repo = hub.repos["acme/bigger"]
    size = repo.files[WEIGHTS].size
    # The first 10 MiB chunk is on disk after ~2.6 s; the kill lands ~2.6 s before the
    # rest could be (at 2 MB/s, the chunk alone took 5 s to wait for).
    hub.faults.rate = 4_000_000
    env = env_for(tmp_path, BASEHOLD_HF_ENDPOINT=hub.url)
    server = start(tmp_path, [], env=env)
    try:
        body = {"source": "acme/bigger", "dtype": "float32"}
        model_id = httpx.post(f"{server.url}/v1/models", json=body, timeout=60).json()["id"]

        # /v1/events streams the download's progress; a first 10 MiB chunk is on disk.
        seen = downloading_events(server.url, model_id, CHUNK)
        assert seen[-1]["bytes_total"] == sum(f.size for f in repo.files.values()) - (
            repo.files["config.json"].size
        )
        server.kill()  # SIGKILL mid-download: the loader goes with it
        stopped(hub, tmp_path / "hf-cache", "acme/bigger")
        partial = [b for b in blobs(tmp_path, "acme/bigger") if b.name.endswith(".incomplete")]
        assert len(partial) == 1 and partial[0].stat().st_size >= CHUNK, partial
        left = size - partial[0].stat().st_size
        assert 0 < left < size - CHUNK // 2
        hub.reset_counts()
        hub.faults.rate = None
        port = int(server.url.rsplit(":", 1)[1])
        server = start(tmp_path, [], env=env, port=port, ready=False)
        with httpx.Client(base_url=server.url) as http:  # not httpx.get: a client per poll
            until(
                lambda: http.get(f"/v1/models/{model_id}").json()["state"] == "ready",
                "restored",
                120,
            )
        second = hub.bytes_served("acme/bigger")
        assert second < 1.1 * left, (second, left, size)
        assert any(r.range == f"bytes={size - left}-" for r in hub.requests), hub.requests
    finally:
        server.stop()


def test_a_cached_snapshot_is_not_fetched_again(hub_client: TestClient, hub: LocalHub) -> None:
    first = wait_for(
        hub_client, hub_client.post("/v1/models", json={"source": "acme/llama"}).json()["id"]
    )
    assert first["state"] == "ready"
    assert hub_client.delete(f"/v1/models/{first['id']}").status_code in (202, 204)
    until(lambda: hub_client.get(f"/v1/models/{first['id']}").status_code == 404, "unloaded")
    hub.reset_counts()
    again = wait_for(
        hub_client, hub_client.post("/v1/models", json={"source": "acme/llama"}).json()["id"]
    )
    assert again["state"] == "ready" and again["resolved_revision"] == first["resolved_revision"]
    assert hub.bytes_served("acme/llama") == 0  # the commit and the file list only
    assert {r.method for r in hub.requests} == {"GET"} and all(
        "/api/" in r.path and "/tree/" not in r.path for r in hub.requests
    )


def test_a_hub_load_resolves_its_revision_once(hub_client: TestClient, hub: LocalHub) -> None:
    """Admission prices a commit and its files; the loader downloads that snapshot without
    asking the hub what `main` is again (it may have moved meanwhile)."""
    status = wait_for(
        hub_client, hub_client.post("/v1/models", json={"source": "acme/bigger"}).json()["id"]
    )
    assert status["state"] == "ready", status
    assert status["resolved_revision"] == hub.repos["acme/bigger"].commit
    resolves = [r for r in hub.requests if r.path.startswith("/api/") and "/revision/" in r.path]
    assert [r.path for r in resolves] == ["/api/models/acme/bigger/revision/main"]


def test_a_repo_without_weights_fails_before_any_download(
    hub_client: TestClient, hub: LocalHub, models_root: Path, tmp_path: Path
) -> None:
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_bytes(
        (models_root / "llama" / "config.json").read_bytes()
    )
    hub.add("acme/no-weights", tmp_path / "no-weights")
    status = wait_for(
        hub_client, hub_client.post("/v1/models", json={"source": "acme/no-weights"}).json()["id"]
    )
    assert status["error"]["code"] == "invalid_checkpoint", status
    assert "has no weights" in status["error"]["message"]


def test_a_cached_model_loads_while_the_hub_is_down(hub_client: TestClient, hub: LocalHub) -> None:
    post = {"source": "acme/llama", "revision": "v1"}
    first = wait_for(hub_client, hub_client.post("/v1/models", json=post).json()["id"])
    assert first["state"] == "ready"
    assert hub_client.delete(f"/v1/models/{first['id']}").status_code in (202, 204)
    until(lambda: hub_client.get(f"/v1/models/{first['id']}").status_code == 404, "unloaded")
    hub.stop()  # connections refused from now on
    again = wait_for(hub_client, hub_client.post("/v1/models", json=post).json()["id"])
    assert again["state"] == "ready", again["error"]
    assert again["resolved_revision"] == hub.repos["acme/llama"].commit
    # Not cached at all: the load fails and says what to check.
    missing = wait_for(
        hub_client, hub_client.post("/v1/models", json={"source": "acme/bigger"}).json()["id"]
    )
    assert missing["error"]["code"] == "download_failed", missing
    assert "access to the Hub" in missing["error"]["message"]


def test_a_hub_that_never_answers_fails_the_load_instead_of_hanging(
    make_client: ClientFactory, hub: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")  # huggingface_hub's metadata timeout
    with socket.socket() as silent:  # connections are accepted (backlog), never answered
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        client = make_client(hf_endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}")
        response = client.post("/v1/models", json={"source": "acme/llama"})
        assert response.status_code == 202, response.text  # priced later, by its loader
        status = wait_for(client, response.json()["id"])
    assert status["error"]["code"] == "download_failed", status
    assert "ReadTimeout" in status["error"]["message"]
