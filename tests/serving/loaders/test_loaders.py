"""Loads run in loader processes: a crash, a kill or a cancel mid-load ends that load
only; a runner's death fails its model only; nothing stays behind in the service."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State
from tests.conftest import app_of, load, until, wait_for


def _fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd") if _alive(n)}


def _alive(n: str) -> bool:
    try:
        os.readlink(f"/proc/self/fd/{n}")
    except OSError:
        return False
    return True


def _memfds() -> list[str]:
    """The service's memfd mappings and fds (arenas it holds)."""
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if "memfd:" in line]
    return mapped + [fd for fd in _fds() if fd.startswith("/memfd:")]


@contextmanager
def frozen_loader(client: TestClient) -> Iterator[dict[str, int]]:
    """Stop (SIGSTOP) each loader at its first message: the load is then surely mid-way.
    Yields {model id: loader pid} as loads get frozen."""
    registry = app_of(client).state.registry
    frozen: dict[str, int] = {}
    lock = threading.Lock()

    def listener(record: ModelRecord, previous: State, target: State) -> None:
        loader = record.loader
        if target != State.LOADING or loader is None or loader.pid is None:
            return
        with lock:
            if record.id not in frozen:
                os.kill(loader.pid, signal.SIGSTOP)
                frozen[record.id] = loader.pid

    registry.subscribe(listener)
    try:
        yield frozen
    finally:
        registry._listeners.remove(listener)
        for pid in frozen.values():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _start(client: TestClient, frozen: dict[str, int], **body: Any) -> tuple[str, int]:
    response = client.post("/v1/models", json=body)
    assert response.status_code == 202, response.text
    model_id = response.json()["id"]
    until(lambda: model_id in frozen, "the loader never reported")
    assert client.get(f"/v1/models/{model_id}").json()["state"] == "loading"
    return model_id, frozen[model_id]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_loader_that_dies_mid_load_fails_that_load_only(
    client: TestClient, models_root: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    held = load(client, source=str(models_root / "gpt2"), dtype="float32")
    grant = client.post(f"/v1/models/{held['id']}/leases", json={"holder": "w"}).json()
    fds, memfds = _fds(), _memfds()
    with frozen_loader(client) as frozen:
        model_id, pid = _start(client, frozen, source=str(models_root / "llama"), dtype="float32")
        os.kill(pid, sig)
        os.kill(pid, signal.SIGCONT)  # a stopped process takes SIGSEGV once it runs
        failed = wait_for(client, model_id, ("failed",), timeout=30)
    assert failed["error"]["code"] == "loader_crashed"
    assert signal.Signals(sig).name in failed["error"]["message"]
    assert _gone(pid)
    # Nothing else changed: the held model and its lease, nothing left in the service.
    again = client.get(f"/v1/models/{held['id']}").json()
    assert again["state"] == "ready" and again["leases"] == 1
    leases = client.get("/v1/leases").json()["leases"]
    assert [lease["lease_id"] for lease in leases] == [grant["lease_id"]]
    assert _fds() <= fds and _memfds() == memfds
    assert not any(app_of(client).state.settings.offload_dir.iterdir())
    # And the same load works next time.
    retried = client.post(
        "/v1/models", json={"source": str(models_root / "llama"), "dtype": "float32"}
    )
    assert wait_for(client, retried.json()["id"])["state"] == "ready"


def test_delete_mid_load_ends_the_loader_within_two_seconds(
    client: TestClient, models_root: Path
) -> None:
    fds, memfds = _fds(), _memfds()
    with frozen_loader(client) as frozen:
        model_id, pid = _start(client, frozen, source=str(models_root / "llama"))
        started = time.monotonic()
        assert client.delete(f"/v1/models/{model_id}").status_code in (202, 204)
        until(lambda: client.get(f"/v1/models/{model_id}").status_code == 404, "not gone", 2)
        assert time.monotonic() - started < 2
    until(lambda: _gone(pid), "the loader still runs", 2)
    assert _fds() <= fds and _memfds() == memfds


def test_a_runner_that_dies_fails_its_model_only(client: TestClient, models_root: Path) -> None:
    shared = load(client, source=str(models_root / "gpt2"), dtype="float32")
    private = load(client, source=str(models_root / "llama"), quantization={"method": "bnb-8bit"})
    assert private["state"] == "ready" and private["shareable"] is False
    runner = app_of(client).state.registry.get(private["id"]).loader  # it stays as the runner
    assert runner is not None and runner.pid is not None and not _gone(runner.pid)
    os.kill(runner.pid, signal.SIGKILL)
    failed = wait_for(client, private["id"], ("failed",), timeout=30)
    assert failed["error"]["code"] == "loader_crashed"
    assert "SIGKILL" in failed["error"]["message"]
    assert client.get(f"/v1/models/{shared['id']}").json()["state"] == "ready"
    assert client.post(f"/v1/models/{shared['id']}/leases", json={"holder": "w"}).status_code == 201


def test_unloading_a_runner_model_ends_its_runner(client: TestClient, models_root: Path) -> None:
    private = load(client, source=str(models_root / "llama"), quantization={"method": "bnb-8bit"})
    runner = app_of(client).state.registry.get(private["id"]).loader  # it stays as the runner
    assert runner is not None and runner.pid is not None
    assert client.delete(f"/v1/models/{private['id']}").status_code == 204
    until(lambda: _gone(runner.pid or 0), "the runner outlived its model", 5)


def test_a_shareable_models_loader_exits_once_it_handed_over(
    client: TestClient, models_root: Path
) -> None:
    pids: list[int] = []
    registry = app_of(client).state.registry

    def listener(record: ModelRecord, previous: State, target: State) -> None:
        if record.loader is not None and record.loader.pid is not None:
            pids.append(record.loader.pid)

    registry.subscribe(listener)
    status = load(client, source=str(models_root / "llama"), dtype="float32")
    assert status["shareable"] is True and pids
    until(lambda: _gone(pids[-1]), "the loader stayed", 5)
    # The model lives on in the fd the service holds: a worker still attaches it.
    grant = client.post(f"/v1/models/{status['id']}/leases", json={"holder": "w"})
    assert grant.status_code == 201
