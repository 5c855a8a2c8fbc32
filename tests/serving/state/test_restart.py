"""Durable holding, for real: `basehold serve` killed with SIGKILL and started again on the
same state directory and port, with workers and clients that outlive it."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from service.serving.state.database import FILENAME
from service.worker.client import Client
from tests import checkpoints
from tests.common.handles.arenas import arena_fds
from tests.conftest import LLAMA_LAYERS_ON_DISK, until
from tests.reference import from_pretrained
from tests.serving.test_server_e2e import ROOT, Server, server_env, sse, start, wait_ready
from tests.spawn import Process, spawn_worker

pytestmark = pytest.mark.e2e
TOKENS = torch.tensor([[1, 5, 9, 42, 7, 3]])
TTL = 3  # the lease of the worker that outlives a restart


def env_for(*roots: Path, **extra: str) -> dict[str, str]:
    return {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(r) for r in roots]),
        "BASEHOLD_LEASE_REAP_SECONDS": "0.2",
        **extra,
    }


def post(server: Server, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/v1/models", json=body, timeout=60)
    assert response.status_code in (200, 202), response.text
    result: dict[str, Any] = response.json()
    return result


def restart(server: Server, tmp_path: Path, env: dict[str, str], ready: bool = True) -> Server:
    server.kill()
    return start(tmp_path, [], env=env, port=int(server.url.rsplit(":", 1)[1]), ready=ready)


def db_models(tmp_path: Path) -> dict[str, str]:
    conn = sqlite3.connect(tmp_path / "state" / FILENAME)
    try:
        return dict(conn.execute("SELECT id, state FROM models").fetchall())
    finally:
        conn.close()


def events(server: Server, kinds: set[str], count: int) -> list[dict[str, Any]]:
    """The first `count` events of `kinds` since the process started (Last-Event-ID 0)."""
    found: list[dict[str, Any]] = []
    for kind, data in sse(server.url):
        if kind in kinds:
            found.append({"event": kind, **data})
            if len(found) >= count:
                return found
    return found


def test_ready_models_and_leases_come_back_after_sigkill(tmp_path: Path, models_root: Path) -> None:
    env = env_for(models_root)
    server = start(tmp_path, [], env=env)
    try:
        spec_a = {"source": str(models_root / "llama"), "name": "a", "dtype": "float32"}
        spec_b = {"source": str(models_root / "gpt2"), "name": "b", "dtype": "float32"}
        post(server, **spec_a)
        wait_ready(server.url, "a")
        post(server, **spec_b)
        before = {m: wait_ready(server.url, m) for m in ("a", "b")}
        post(server, **spec_a)  # using "a" again makes it the most recently used
        lease = httpx.post(
            f"{server.url}/v1/models/a/leases", json={"holder": "trainer-1", "ttl_seconds": 30}
        ).json()

        server = restart(server, tmp_path, env)
        log = server.output()
        assert "restoring 2 model(s) (most recently used first: a, b) and 1 lease(s)" in log
        for model_id in ("a", "b"):
            status = wait_ready(server.url, model_id)
            assert status["state"] == "ready", status
            assert status["spec"] == before[model_id]["spec"]
            assert status["timings"]["restored_at"] is not None
        assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready", "restoring": 0}
        assert wait_ready(server.url, "a")["leases"] == 1
        renewed = httpx.post(
            f"{server.url}/v1/leases/{lease['lease_id']}/renew",
            headers={"X-Lease-Secret": lease["secret"]},
        )
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["holder"] == "trainer-1"
        restored = events(server, {"restore", "state"}, 3)
        assert restored[0]["event"] == "state" and restored[0]["restored"] is True
        assert {"event": "restore", "restoring": 2, "leases": 1}.items() <= next(
            e for e in events(server, {"restore"}, 1)
        ).items()

        # A worker attaches to the restored model and gets the checkpoint's logits.
        reference = from_pretrained(AutoModelForCausalLM, models_root / "llama", device_map="cpu")
        attached = Client(server.url).attach("a", holder="after-restart", ttl_seconds=30)
        with attached as model, torch.no_grad():
            assert torch.equal(model(TOKENS).logits, reference(TOKENS).logits)
        assert db_models(tmp_path) == {"a": "ready", "b": "ready"}
    finally:
        server.stop()


def test_a_worker_keeps_its_lease_through_a_restart(tmp_path: Path, models_root: Path) -> None:
    env = env_for(models_root)
    server = start(tmp_path, [], env=env)
    worker: Process | None = None
    try:
        post(server, source=str(models_root / "llama"), name="a", dtype="float32")
        wait_ready(server.url, "a")
        worker = spawn_worker(server.url, "a", "hold", {"ttl": TTL})
        assert worker.stdout is not None and worker.stdout.readline().strip() == "attached"
        [lease] = httpx.get(f"{server.url}/v1/leases").json()["leases"]
        server.kill()
        # Down past every expiry it can have granted (a renewal just before the kill gave
        # at most TTL seconds): the worker's renewals fail past its lease's expiry.
        expired = time.monotonic() + TTL + 0.2
        until(lambda: time.monotonic() > expired, "the clock stopped", 10)
        server = restart(server, tmp_path, env)
        deadline = time.monotonic() + 30
        first_seen: str | None = None
        while True:  # the worker's renewer gets through again (it renews every TTL/3)
            [now] = httpx.get(f"{server.url}/v1/leases").json()["leases"]
            if now["expires_at"] > lease["expires_at"] and now["lease_id"] == lease["lease_id"]:
                if first_seen is not None and now["expires_at"] > first_seen:
                    break  # renewed twice since the restart
                first_seen = first_seen or now["expires_at"]
            assert time.monotonic() < deadline, "the worker never renewed after the restart"
            time.sleep(0.2)
        out, err = worker.communicate("go\n", timeout=120)
        assert worker.returncode == 0, err
        assert "forward_sum" in out and "lost" not in err
        assert httpx.get(f"{server.url}/v1/leases").json()["leases"] == []  # released
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        server.stop()


def test_client_wait_waits_through_a_restart(tmp_path: Path, models_root: Path) -> None:
    env = env_for(models_root)
    server = start(tmp_path, [], env=env)
    try:
        post(server, source=str(models_root / "llama"), name="a", dtype="float32")
        wait_ready(server.url, "a")
        server.kill()
        # While it is down, a listener on its port hangs up on every connection: wait()
        # must take that as "restarting" and try again, not fail.
        port = int(server.url.rsplit(":", 1)[1])
        tried = 0
        with socket.create_server(("127.0.0.1", port)) as stand_in:
            result: dict[str, Any] = {}
            waiter = threading.Thread(
                target=lambda: result.update(Client(server.url).wait("a", timeout=120))
            )
            waiter.start()
            stand_in.settimeout(30)
            while tried < 3:  # it tried, failed, and tried again (twice)
                conn, _ = stand_in.accept()
                conn.close()
                tried += 1
            assert waiter.is_alive()
        server = restart(server, tmp_path, env, ready=False)
        waiter.join(timeout=120)
        assert result["state"] == "ready" and result["timings"]["restored_at"] is not None
    finally:
        server.stop()


@pytest.mark.slow
def test_a_load_killed_midway_loads_again(tmp_path: Path) -> None:
    models = tmp_path / "models"
    checkpoints.llama_100m(models / "big")
    env = env_for(models)
    server = start(tmp_path, [], env=env)
    try:
        body = {
            "source": str(models / "big"),
            "name": "big",
            "dtype": "float32",
            "offload": True,
            "device_map": LLAMA_LAYERS_ON_DISK,
        }
        post(server, **body)
        deadline = time.monotonic() + 120
        # One client for every poll: a new one per request (its TLS context) costs ~25 ms
        # of CPU, long enough to miss the load's middle on a busy machine.
        with httpx.Client(timeout=10) as http:
            while True:
                status = http.get(f"{server.url}/v1/models/big").json()
                if status["state"] == "loading" and status["progress"]["bytes_done"] > 0:
                    break
                assert status["state"] in ("queued", "loading"), status
                assert time.monotonic() < deadline
                time.sleep(0.01)
        offload = tmp_path / "state" / "offload"
        assert any(offload.iterdir()), "the load wrote no offload folder"
        server = restart(server, tmp_path, env, ready=False)
        answer = httpx.get(f"{server.url}/readyz")
        if answer.status_code == 503:
            assert answer.json()["code"] in ("not_ready", "loaders_starting", "restoring")
        status = wait_ready(server.url, "big", timeout=300)
        assert status["state"] == "ready", status
        assert status["memory"]["by_device"]["disk"] > 0
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        assert len(list(offload.iterdir())) == 1  # the new load's, not the killed one's
    finally:
        server.stop()


def test_a_source_that_is_gone_fails_and_the_rest_restore(
    tmp_path: Path, models_root: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_root / "llama", models / "doomed")
    env = env_for(models_root, models)
    server = start(tmp_path, [], env=env)
    try:
        post(server, source=str(models / "doomed"), name="doomed", dtype="float32")
        post(server, source=str(models_root / "gpt2"), name="kept", dtype="float32")
        assert wait_ready(server.url, "doomed")["state"] == "ready"
        assert wait_ready(server.url, "kept")["state"] == "ready"
        lease = httpx.post(
            f"{server.url}/v1/models/doomed/leases", json={"holder": "w", "ttl_seconds": 60}
        ).json()
        shutil.rmtree(models / "doomed")
        server = restart(server, tmp_path, env)
        failed = httpx.get(f"{server.url}/v1/models/doomed").json()
        assert failed["state"] == "failed"
        assert failed["error"]["code"] == "source_not_found", failed
        assert "Check the path" in failed["error"]["message"]
        assert httpx.get(f"{server.url}/v1/models/kept").json()["state"] == "ready"
        assert db_models(tmp_path) == {"kept": "ready"}  # a failed model is not restored again
        leases = httpx.get(f"{server.url}/v1/leases").json()["leases"]
        assert lease["lease_id"] not in {x["lease_id"] for x in leases}  # ended with it
    finally:
        server.stop()


def test_restore_false_starts_empty(tmp_path: Path, models_root: Path) -> None:
    env = env_for(models_root)
    server = start(tmp_path, [], env=env)
    try:
        post(server, source=str(models_root / "llama"), name="a", dtype="float32")
        wait_ready(server.url, "a")
        server = restart(server, tmp_path, {**env, "BASEHOLD_RESTORE": "false"})
        assert httpx.get(f"{server.url}/v1/models").json() == {"models": []}
        assert "BASEHOLD_RESTORE=false: starting empty; forgot 1 recorded model(s)" in (
            server.output()
        )
        assert db_models(tmp_path) == {}
    finally:
        server.stop()


def test_sigterm_keeps_what_is_held_for_the_next_start(tmp_path: Path, models_root: Path) -> None:
    env = env_for(models_root)
    server = start(tmp_path, [], env=env)
    post(server, source=str(models_root / "llama"), name="a", dtype="float32")
    wait_ready(server.url, "a")
    assert server.stop() == 0
    assert db_models(tmp_path) == {"a": "ready"}
    server = start(tmp_path, [], env=env)
    try:
        assert wait_ready(server.url, "a")["state"] == "ready"
        assert httpx.delete(f"{server.url}/v1/models/a").status_code == 204
        assert db_models(tmp_path) == {}
    finally:
        server.stop()


def test_a_second_instance_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    server = start(tmp_path, [])
    try:
        second = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--port", "1"],
            cwd=ROOT,
            env={**os.environ, **server_env(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        assert f"another basehold (pid {server.process.pid})" in second.stderr
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    finally:
        server.stop()


def test_a_corrupt_database_is_moved_aside(tmp_path: Path, models_root: Path) -> None:
    env = env_for(models_root)
    server = start(tmp_path, [], env=env)
    post(server, source=str(models_root / "llama"), name="a", dtype="float32")
    wait_ready(server.url, "a")
    server.kill()
    database = tmp_path / "state" / FILENAME
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    database.write_bytes(b"\x00garbage" * 4096)
    server = start(tmp_path, [], env=env)
    try:
        assert "STATE DATABASE UNREADABLE" in server.output()
        assert httpx.get(f"{server.url}/v1/models").json() == {"models": []}
        [aside] = (tmp_path / "state").glob(f"{FILENAME}.corrupt-*")
        assert aside.read_bytes() == b"\x00garbage" * 4096
    finally:
        server.stop()


CHURN: dict[str, dict[str, Any]] = {
    "l": {"source": "llama", "dtype": "float32"},
    "g": {"source": "gpt2", "dtype": "float32"},
    "q": {"source": "llama-tied", "dtype": "float32", "quantization": {"method": "bnb-4bit"}},
}


def churn(
    url: str, models_root: Path, seed: int, stop: threading.Event, posted: threading.Event
) -> None:
    """Loads and unloads at random until the server goes away; `posted` is set once a
    load request has been answered (a fresh server's first one takes ~1.5 s: it imports
    the model's code)."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            name = rng.choice(sorted(CHURN))
            try:
                if rng.random() < 0.6:
                    spec = {**CHURN[name], "source": str(models_root / CHURN[name]["source"])}
                    http.post("/v1/models", json={**spec, "name": name})
                    posted.set()
                else:
                    http.delete(f"/v1/models/{name}", params={"force": "true"})
            except httpx.TransportError:
                return
            time.sleep(rng.uniform(0, 0.05))


# Each cycle kills the server at a random moment of a random load/unload churn (~1.8 s a
# cycle). Eight sample the churn's phases (queued, loading, ready, unloading, several at
# once) twice each on average; the moments a kill can land are also covered one by one by
# the tests above (mid-load, after a SIGTERM, a source gone, a corrupt database).
CYCLES = 8


@pytest.mark.slow
def test_random_kill_restart_cycles_leave_registry_db_and_memory_agreeing(
    tmp_path: Path, models_root: Path
) -> None:
    rng = random.Random(20261128)
    env = env_for(models_root)
    server = start(tmp_path, [], env=env)
    held_at_kill = 0
    try:
        for cycle in range(CYCLES):
            stop, posted = threading.Event(), threading.Event()
            worker = threading.Thread(
                target=churn, args=(server.url, models_root, cycle, stop, posted)
            )
            worker.start()
            posted.wait(timeout=60)  # the kill lands in the churn, not before it starts
            time.sleep(rng.uniform(0.1, 1.5))
            server.kill()
            stop.set()
            worker.join(timeout=60)
            server = start(tmp_path, [], env=env, port=int(server.url.rsplit(":", 1)[1]))
            models = httpx.get(f"{server.url}/v1/models").json()["models"]
            states = {m["id"]: m["state"] for m in models}
            assert set(states.values()) <= {"ready"}, (cycle, models)
            assert db_models(tmp_path) == states, cycle
            memory = httpx.get(f"{server.url}/v1/memory").json()
            assert {m["id"] for m in memory["models"]} == set(states), cycle
            assert len(arena_fds(server.pid)) == len(states), cycle
            held = sum(m["memory"]["footprint_bytes"] for m in models)
            assert memory["host"]["held_bytes"] == held, cycle
            held_at_kill += bool(states)
        assert held_at_kill >= 5, "too few cycles held anything: the test proves little"
    finally:
        server.stop()
