"""GET /v1/memory/history: the serving process's ring buffer of memory samples, filled
off the event loop while the app runs and stopped with it."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.serving.api.schemas import (
    DeviceSampleOut,
    HostSampleOut,
    MemoryHistoryOut,
    MemorySampleOut,
)
from service.serving.app import create_app
from service.serving.memory.history import HostSample, MemoryHistory, MemorySample
from service.serving.settings import Settings
from tests.conftest import wait_for
from tests.serving.api.test_memory import FakeCuda, FakeNvml

ADMIN = "history-admin-key-1"
READER = "history-read-key-1"
WORKER = "history-worker-key-1"


def _sample(at: datetime) -> MemorySample:
    host = HostSample(1, 2, 3, 4, 0, None, None)
    return MemorySample(at=at, host=host, devices=())


def test_the_ring_keeps_the_last_span_oldest_first() -> None:
    history = MemoryHistory(every=5.0, span=3600.0)
    assert history.capacity == 720
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(1000):
        history.add(_sample(start + timedelta(seconds=5 * i)))
    kept = history.samples()
    assert len(kept) == 720
    assert kept[0].at == start + timedelta(seconds=5 * 280)  # the oldest 280 fell out
    assert kept == sorted(kept, key=lambda s: s.at)


def _history_app(tmp_path: Path, socket_path: Path, models_root: Path) -> TestClient:
    settings = Settings(
        state_dir=tmp_path / "state",
        socket=socket_path,
        model_roots=[models_root],
        api_keys={ADMIN: ["admin"], READER: ["read"], WORKER: ["worker"]},
    )
    # Fast and short: a sample every 20 ms, 10 kept.
    app = create_app(settings, cuda=FakeCuda(1), gpus=FakeNvml(), history=MemoryHistory(0.02, 0.2))
    return TestClient(app, base_url="http://localhost")


def _get(client: TestClient, key: str) -> dict[str, Any]:
    answer = client.get("/v1/memory/history", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _poll(client: TestClient, done: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = _get(client, READER)
        if done(body):
            return body
        assert time.monotonic() < deadline, f"history never got there: {json.dumps(body)[:400]}"
        time.sleep(0.02)


def test_history_needs_read_scope_and_stays_bounded(
    tmp_path: Path, socket_path: Path, models_root: Path
) -> None:
    with _history_app(tmp_path, socket_path, models_root) as client:
        missing = client.get("/v1/memory/history")
        assert missing.status_code == 401
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["code"] == "unauthorized"
        for key in (ADMIN, WORKER):  # both imply read
            assert _get(client, key)["interval_seconds"] == 0.02
        body = _poll(client, lambda b: len(b["samples"]) == 10)
        first = body["samples"][0]["at"]
        # Samples keep coming while the ring stays at its size.
        later = _poll(client, lambda b: b["samples"][0]["at"] > first and len(b["samples"]) == 10)
        times = [s["at"] for s in later["samples"]]
        assert times == sorted(times)
        assert later["span_seconds"] == 0.2
        sample = later["samples"][-1]
        assert sample["host"]["total_bytes"] > sample["host"]["used_bytes"] > 0
        assert sample["devices"][0] == {
            "id": "cuda:0",
            "used_bytes": 20 << 30,
            "held_bytes": 0,
            "leased_bytes": 0,
            "total_bytes": 80 << 30,
        }
        # The answer is what its documented schema says, field for field.
        MemoryHistoryOut.model_validate(later)
        assert set(later) == set(MemoryHistoryOut.model_fields)
        assert set(sample) == set(MemorySampleOut.model_fields)
        assert set(sample["host"]) == set(HostSampleOut.model_fields)
        assert set(sample["devices"][0]) == set(DeviceSampleOut.model_fields)
    schema = client.app.openapi()["paths"]["/v1/memory/history"]["get"]  # type: ignore[attr-defined]
    assert {"401", "403"} <= set(schema["responses"])


def test_samples_show_held_arena_and_leased_bytes(
    tmp_path: Path, socket_path: Path, models_root: Path
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with _history_app(tmp_path, socket_path, models_root) as client:
        body = {"source": str(models_root / "llama"), "name": "hist", "dtype": "float32"}
        assert client.post("/v1/models", json=body, headers=admin).status_code == 202
        status = wait_for(client, "hist", headers=admin)
        assert status["state"] == "ready", status
        cpu = status["memory"]["by_device"]["cpu"]
        held = _poll(client, lambda b: b["samples"][-1]["host"]["held_bytes"] == cpu)
        host = held["samples"][-1]["host"]
        assert host["leased_bytes"] == 0 and host["arena_bytes"] > 0
        lease = client.post(
            "/v1/models/hist/leases",
            json={"holder": "trainer", "ttl_seconds": 600},
            headers={"Authorization": f"Bearer {WORKER}"},
        )
        assert lease.status_code == 201, lease.text
        _poll(client, lambda b: b["samples"][-1]["host"]["leased_bytes"] == cpu)


def test_no_sampler_thread_outlives_the_app(
    tmp_path: Path, socket_path: Path, models_root: Path
) -> None:
    before = {t.ident for t in threading.enumerate()}
    with _history_app(tmp_path, socket_path, models_root) as client:
        _poll(client, lambda b: len(b["samples"]) >= 3)
    deadline = time.monotonic() + 30
    while True:
        probes = [
            t.name
            for t in threading.enumerate()
            if t.ident not in before and t.name.startswith("probe")
        ]
        if not probes:
            break
        assert time.monotonic() < deadline, f"still running after shutdown: {probes}"
        time.sleep(0.02)
