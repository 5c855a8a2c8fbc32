"""Handles end to end: a real uvicorn server and training workers as independent processes."""

from __future__ import annotations

import json
import mmap
import os
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.common.socket_protocol import ArenaRefused
from service.worker.socket import receive_arena
from tests import checkpoints
from tests.common.handles.arenas import arena_fds, arena_of, sealed, sha256
from tests.conftest import until
from tests.serving.test_server_e2e import Server, start
from tests.shared_memory import held_shared_memory, holders, shared_objects
from tests.spawn import Process, spawn_worker

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(live_server: Server) -> Server:
    return live_server


def load(server: Server, **body: Any) -> dict[str, Any]:
    model_id = httpx.post(f"{server.url}/v1/models", json=body).json()["id"]
    with httpx.Client(base_url=server.url) as http:  # not httpx.get: a client per poll
        while True:
            status: dict[str, Any] = http.get(f"/v1/models/{model_id}").json()
            if status["state"] in ("ready", "failed"):
                assert status["state"] == "ready", status
                return status
            time.sleep(0.05)


def worker(server: Server, model_id: str, mode: str, spec: dict[str, Any]) -> Process:
    return spawn_worker(server.url, model_id, mode, spec)


def released(server: Server, baseline: int) -> None:
    """The service's processes hold no more shared memory than at `baseline` (measured by
    tests/shared_memory.py; a loader may still be on its way out)."""
    until(
        lambda: held_shared_memory(server.pid) - baseline < 1 << 20,
        "the service (or one of its loaders) still holds shared memory",
    )


CASES: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {
    "llama-fp32": (
        {"dtype": "float32"},
        "llama",
        {"auto_class": "AutoModelForCausalLM", "targets": ["q_proj", "v_proj"]},
    ),
    "llama-nf4-double-quant": (
        {
            "dtype": "float32",
            "quantization": {"method": "bnb-4bit", "quant_type": "nf4", "double_quant": True},
        },
        "llama",
        {"auto_class": "AutoModelForCausalLM", "targets": ["q_proj", "v_proj"]},
    ),
    "llama-tied": (
        {"dtype": "float32"},
        "llama-tied",
        {"auto_class": "AutoModelForCausalLM", "targets": ["q_proj"], "tied": True},
    ),
    "bert-seq-cls": (
        {"dtype": "float32", "task": "seq-cls"},
        "bert-cls",
        {"auto_class": "AutoModelForSequenceClassification", "targets": ["query", "value"]},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attach_train_release_unload(server: Server, models_root: Path, case: str) -> None:
    load_spec, folder, extra = CASES[case]
    baseline = held_shared_memory(server.pid)
    source = str(models_root / folder)
    status = load(server, source=source, **load_spec)
    assert status["shareable"] is True, status
    [(name, arena)] = arena_fds(server.pid).items()
    before = sha256(arena)
    assert sealed(arena)
    spec = {"source": source, **load_spec, **extra}
    proc = worker(server, status["id"], "train", spec)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["identical"], "worker logits differ from from_pretrained"
    assert result["adapter_changed"]
    assert result["outside_arena"] == []
    assert result["arena"] == name
    assert result["leases_while_attached"] == 1
    if extra.get("tied"):
        assert result["tied"]
    assert sha256(arena) == before, "the base weights changed"
    assert httpx.get(f"{server.url}/v1/leases").json()["leases"] == []
    assert httpx.delete(f"{server.url}/v1/models/{status['id']}").status_code == 204
    assert arena_fds(server.pid) == {}
    released(server, baseline)


def test_sigkilled_worker_lease_expires(server: Server, models_root: Path) -> None:
    status = load(server, source=str(models_root / "llama"), dtype="float32")
    proc = worker(server, status["id"], "hold", {"ttl": 1})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
    [first] = httpx.get(f"{server.url}/v1/leases").json()["leases"]
    # Renewals keep a live worker's lease: it is still there well past the expiry it had
    # (by more than the 0.2 s reaper period), with a later one.
    past = datetime.fromisoformat(first["expires_at"]) + timedelta(seconds=0.5)
    until(lambda: datetime.now(timezone.utc) > past, "the clock stopped", 10)
    [renewed] = httpx.get(f"{server.url}/v1/leases").json()["leases"]
    assert renewed["lease_id"] == first["lease_id"]
    expiry = datetime.fromisoformat(renewed["expires_at"])
    assert expiry > datetime.fromisoformat(first["expires_at"]), (first, renewed)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with httpx.Client(base_url=server.url) as http:  # not httpx.get: a client per poll
        until(
            lambda: not http.get(f"/v1/models/{status['id']}").json()["leases"],
            "lease of a dead worker never expired",
            10,
        )
    assert httpx.delete(f"{server.url}/v1/models/{status['id']}").status_code == 204
    assert "expired" in server.output()


def test_unload_is_refused_then_forced_and_worker_survives(
    server: Server, models_root: Path
) -> None:
    baseline = held_shared_memory(server.pid)
    status = load(server, source=str(models_root / "llama"), dtype="float32")
    proc = worker(server, status["id"], "hold", {"ttl": 30})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
    refused = httpx.delete(f"{server.url}/v1/models/{status['id']}")
    assert refused.status_code == 409 and refused.json()["code"] == "model_leased"
    forced = httpx.delete(f"{server.url}/v1/models/{status['id']}", params={"force": "true"})
    assert forced.status_code == 204
    assert arena_fds(server.pid) == {}
    # The service let go of the arena, but the worker still maps it and keeps working.
    out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, err
    assert "forward_sum" in out
    released(server, baseline)


def test_an_in_place_write_in_a_worker_changes_nobody_elses_weights(
    server: Server, models_root: Path
) -> None:
    source = str(models_root / "llama")
    status = load(server, source=source, dtype="float32")
    arena = arena_of(server.pid)
    before = sha256(arena)
    proc = worker(server, status["id"], "write", {})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err  # no SIGSEGV: the written pages are the worker's own
    assert json.loads(out.strip().splitlines()[-1]) == {"changed": True}
    assert sha256(arena) == before
    spec = {"source": source, "dtype": "float32", **CASES["llama-fp32"][2]}
    after = worker(server, status["id"], "train", spec)
    out, err = after.communicate(timeout=300)
    assert after.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["identical"]


def test_same_user_cannot_change_the_weights_through_proc_fd(
    server: Server, models_root: Path
) -> None:
    """Every fd of the service opened again read-write from another process: the arenas
    refuse writes, truncation and writable shared mappings."""
    status = load(server, source=str(models_root / "llama"), dtype="float32")
    arena = arena_of(server.pid)
    before = sha256(arena)
    attacked = 0
    for entry in Path(f"/proc/{server.pid}/fd").iterdir():
        try:
            fd = os.open(entry, os.O_RDWR)
        except OSError:
            continue  # sockets, pipes, read-only files
        try:
            if not os.readlink(entry).startswith("/memfd:basehold:"):
                continue  # the log, the state database: not weights, not ours to poison
            attacked += 1
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"\xff" * 4096, 4096)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
    assert attacked >= 1  # the arena (its mmap holds a second fd of the same memfd)
    assert sha256(arena) == before
    spec = {"source": str(models_root / "llama"), "dtype": "float32"}
    proc = worker(server, status["id"], "train", {**spec, **CASES["llama-fp32"][2]})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["identical"]


def test_the_socket_refuses_a_wrong_or_missing_secret(server: Server, models_root: Path) -> None:
    status = load(server, source=str(models_root / "llama"), dtype="float32")
    grant = httpx.post(
        f"{server.url}/v1/models/{status['id']}/leases", json={"holder": "w", "ttl_seconds": 30}
    ).json()
    socket_path = grant["handle"]["arena"]["socket"]
    for lease_id, secret, code in [
        (grant["lease_id"], "wrong", "lease_forbidden"),
        (grant["lease_id"], "", "lease_forbidden"),
        ("lease-0000000000000000", grant["secret"], "lease_not_found"),
    ]:
        with pytest.raises(ArenaRefused) as refused:
            receive_arena(socket_path, lease_id, secret, os.getuid())
        assert refused.value.code == code
    fd = receive_arena(
        socket_path, grant["lease_id"], grant["secret"], grant["handle"]["socket_uid"]
    )
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:basehold:")
    finally:
        os.close(fd)
    assert f"refused {grant['lease_id']}" in server.output()
    assert f"sent to pid {os.getpid()} uid {os.getuid()}" in server.output()
    assert oct(os.stat(socket_path).st_mode & 0o777) == oct(0o600)


@pytest.mark.slow
def test_service_sigkill_leaves_nothing_behind_and_the_worker_finishes(
    server: Server, tmp_path: Path
) -> None:
    checkpoints.llama(tmp_path / "models" / "mid", hidden=512, layers=4, vocab=8000, heads=8)
    server.stop()
    env = {"BASEHOLD_MODEL_ROOTS": json.dumps([str(tmp_path / "models")])}
    live = start(tmp_path, [], env=env)
    dev_shm = set(os.listdir("/dev/shm"))
    status = load(live, source=str(tmp_path / "models" / "mid"), dtype="float32")
    size = status["memory"]["footprint_bytes"]
    arena = os.stat(arena_of(live.pid))
    key = (arena.st_dev, arena.st_ino)  # this arena, whoever else holds shared memory
    proc = worker(live, status["id"], "hold", {"ttl": 2, "steps": 3})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
    live.kill()
    # A file another process puts in /dev/shm meanwhile passes; one the service left stays.
    until(lambda: set(os.listdir("/dev/shm")) <= dev_shm, "the service left files in /dev/shm")
    assert proc.pid in holders(key)  # the worker still maps the arena
    assert shared_objects([proc.pid])[key].size > 0.8 * size
    out, err = proc.communicate("go\n", timeout=300)
    assert proc.returncode == 0, err
    assert "forward_sum" in out and "Traceback" not in err
    assert "could not release it" in err
    assert holders(key) == [], "the arena outlived its last user"
    live.stop()
