"""Prometheus metrics (in-process) and Server-Sent Events over a real HTTP connection."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import load
from tests.serving.api.test_memory import answers_while_a_probe_is_stuck, nvml_app
from tests.serving.test_server_e2e import Server, start


def sample(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{label_text}}}" if labels else name) + r" ([0-9.e+-]+)"
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def test_metrics_move_with_the_registry(client: TestClient, models_root: Path) -> None:
    text = client.get("/metrics").text
    assert sample(text, "basehold_models", state="ready") == 0
    status = load(client, source=str(models_root / "gpt2"), dtype="float32")
    load(client, source=str(models_root / "llama"), task="seq2seq-lm")  # fails
    client.post(f"/v1/models/{status['id']}/leases", json={"holder": "w", "ttl_seconds": 60})
    text = client.get("/metrics").text
    assert sample(text, "basehold_models", state="ready") == 1
    assert sample(text, "basehold_models", state="failed") == 1
    assert sample(text, "basehold_models", state="loading") == 0
    assert sample(text, "basehold_held_bytes", device="cpu") == status["memory"]["by_device"]["cpu"]
    assert sample(text, "basehold_load_seconds_count") == 1
    assert sample(text, "basehold_load_failures_total", code="wrong_model_type") == 1
    assert sample(text, "basehold_leases") == 1
    assert sample(text, "basehold_shared_arena_bytes") > 0
    assert (
        sample(
            text, "basehold_http_requests_total", method="POST", route="/v1/models", status="202"
        )
        == 2
    )
    assert "basehold_http_request_seconds_bucket" in text
    assert "basehold_evictions_total" in text
    client.delete(f"/v1/models/{status['id']}?force=true")
    text = client.get("/metrics").text
    assert sample(text, "basehold_models", state="ready") == 0
    assert sample(text, "basehold_held_bytes", device="cpu") == 0


@pytest.fixture
def server(tmp_path: Path, models_root: Path) -> Iterator[Server]:
    running = start(tmp_path, [], env={"BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)])})
    yield running
    running.stop()


def read_events(
    url: str,
    until: str,
    headers: dict[str, str] | None = None,
    ready: threading.Event | None = None,
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with httpx.stream("GET", f"{url}/v1/events", headers=headers, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        if ready is not None:
            ready.set()
        for line in response.iter_lines():
            if line.startswith("id:"):
                current["id"] = int(line[3:].strip())
            elif line.startswith("event:"):
                current["event"] = line[6:].strip()
            elif line.startswith("data:"):
                current["data"] = json.loads(line[5:].strip())
            elif not line and "data" in current:
                events.append(current)
                current = {}
                if events[-1]["data"]["state"] == until:
                    return events
    return events


@pytest.mark.e2e
def test_sse_stream_and_resume(server: Server, models_root: Path) -> None:
    got: list[dict[str, Any]] = []
    ready = threading.Event()
    reader = threading.Thread(
        target=lambda: got.extend(read_events(server.url, "ready", ready=ready))
    )
    reader.start()
    assert ready.wait(30)
    httpx.post(
        f"{server.url}/v1/models", json={"source": str(models_root / "llama"), "name": "sse"}
    )
    reader.join(60)
    states = [e["data"]["state"] for e in got if e["event"] == "state"]
    assert states == ["queued", "loading", "ready"]
    assert all(e["data"]["id"] == "sse" for e in got)
    ids = [e["id"] for e in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # A client that lost the connection after the first event resumes where it left off.
    resumed = read_events(server.url, "ready", headers={"Last-Event-ID": str(ids[0])})
    assert [e["id"] for e in resumed] == ids[1:]


def test_retried_failure_leaves_the_failed_gauge(client: TestClient, models_root: Path) -> None:
    import shutil

    broken = models_root / "retry-gauge"
    shutil.copytree(models_root / "llama", broken, dirs_exist_ok=True)
    config = (broken / "config.json").read_bytes()
    (broken / "config.json").unlink()
    assert load(client, source=str(broken))["state"] == "failed"
    assert sample(client.get("/metrics").text, "basehold_models", state="failed") == 1
    (broken / "config.json").write_bytes(config)
    assert load(client, source=str(broken))["state"] == "ready"
    text = client.get("/metrics").text
    assert sample(text, "basehold_models", state="failed") == 0
    assert sample(text, "basehold_models", state="ready") == 1


def test_one_scrape_lists_the_gpus_once(
    tmp_path: Path, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One scrape on 8 GPUs listed every GPU 12 times (~400 NVML calls)."""
    client, library = nvml_app(tmp_path, socket_path, monkeypatch)
    with client:
        library.calls = library.listings = 0
        text = client.get("/metrics").text
        assert sample(text, "basehold_gpu_memory_used_bytes", device="cuda:7") == 48 << 30
        assert library.listings == 1, f"one scrape listed the GPUs {library.listings} times"
        assert library.calls == 1 + 4 * 8


def test_a_stuck_gpu_probe_blocks_no_other_request(client: TestClient) -> None:
    answers_while_a_probe_is_stuck(client, "/metrics")
