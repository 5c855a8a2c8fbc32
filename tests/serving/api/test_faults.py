"""The fault matrix: every way a load or a lease can go wrong, as one parametrized test.

One real server takes every row but the out-of-memory one, which gets a server of its own
under an address-space limit (so a big load really runs out of memory). Each row must end
in its named state, leave nothing behind (the server's RSS, the shared memory the
service's own processes hold: tests/shared_memory.py, open arenas, offload folders) and
leave the service serving."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from tests import checkpoints
from tests.common.handles.arenas import arena_fds
from tests.conftest import LLAMA_LAYERS_ON_DISK
from tests.serving.test_server_e2e import Server, start
from tests.shared_memory import describe, held_shared_memory, holding
from tests.spawn import spawn_worker

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MiB = 1 << 20
# What a row may leave in shared memory: less than any arena (the tiny Llama's is 860 KiB),
# more than a log or state database on a tmpfs grows by in a row.
SHARED_SLACK = 256 << 10


@dataclass
class Bench:
    server: Server
    models: Path
    state: Path
    tmp: Path

    @property
    def url(self) -> str:
        return self.server.url

    def copy(self, name: str) -> Path:
        target = self.models / f"{name}-{time.monotonic_ns()}"
        shutil.copytree(self.models / "llama", target)
        return target

    def post(self, **body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/models", json=body, timeout=60)

    def settle(self, model_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url) as http:  # not httpx.get: a client per poll
            while True:
                answer = http.get(f"/v1/models/{model_id}")
                if answer.status_code == 404:
                    return {"state": "gone"}
                status: dict[str, Any] = answer.json()
                if status["state"] in ("ready", "failed"):
                    return status
                assert time.monotonic() < deadline, status
                time.sleep(0.05)


def failed(bench: Bench, **body: Any) -> str:
    answer = bench.post(**body)
    assert answer.status_code == 202, answer.text
    status = bench.settle(answer.json()["id"])
    assert status["state"] == "failed" and status["memory"]["footprint_bytes"] == 0, status
    httpx.delete(f"{bench.url}/v1/models/{status['id']}")
    return f"failed:{status['error']['code']}"


def refused(bench: Bench, **body: Any) -> str:
    answer = bench.post(**body)
    assert answer.status_code >= 400, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    return f"refused:{answer.status_code}:{answer.json()['code']}"


def corrupt_shard(bench: Bench) -> str:
    folder = bench.copy("corrupt")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))
    return failed(bench, source=str(folder))


def truncated_shard(bench: Bench) -> str:
    folder = bench.copy("truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return failed(bench, source=str(folder))


def missing_config(bench: Bench) -> str:
    folder = bench.copy("noconfig")
    (folder / "config.json").unlink()
    return failed(bench, source=str(folder))


def missing_shard(bench: Bench) -> str:
    folder = bench.copy("noshard")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return failed(bench, source=str(folder))


def wrong_task(bench: Bench) -> str:
    return failed(bench, source=str(bench.models / "llama"), task="seq2seq-lm")


def remote_code(bench: Bench) -> str:
    folder = bench.copy("remote")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="acme", auto_map={"AutoConfig": "acme.AcmeConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    return refused(bench, source=str(folder))


def traversal(bench: Bench) -> str:
    return refused(bench, source=f"{bench.models}/../../etc")


def symlinked_file(bench: Bench) -> str:
    folder = bench.copy("symlinked")
    outside = bench.state.parent / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    return refused(bench, source=str(folder))


def admission_refusal(bench: Bench) -> str:
    """A config that promises ~60 GB (weights on disk are tiny): the estimate refuses it."""
    folder = bench.models / "huge-config"
    folder.mkdir(exist_ok=True)
    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80)
    config.save_pretrained(folder)
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    return refused(bench, source=str(folder), dtype="float32")


def oom_during_load(bench: Bench) -> str:
    """Each loader may map 200 MiB beyond its template (BASEHOLD_LOADER_MEMORY_LIMIT)."""
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(bench.models)]),
        "MALLOC_ARENA_MAX": "2",
        "BASEHOLD_LOADER_MEMORY_LIMIT": "200MiB",
    }
    (bench.tmp / "oom").mkdir(exist_ok=True)
    server = start(bench.tmp / "oom", [], env=env)
    try:
        own = Bench(server, bench.models, bench.tmp / "oom" / "state", bench.tmp / "oom")
        rss = psutil.Process(server.pid).memory_info().rss
        state = failed(own, source=str(bench.models / "big"), dtype="float32")
        assert psutil.Process(server.pid).memory_info().rss - rss < 40 * MiB
        small = own.post(source=str(bench.models / "llama"), dtype="float32")
        assert own.settle(small.json()["id"])["state"] == "ready"  # still serving
        return state
    finally:
        assert server.stop() == 0


def worker_sigkill_with_lease(bench: Bench) -> str:
    answer = bench.post(source=str(bench.models / "llama"), name="leased", dtype="float32")
    assert bench.settle(answer.json()["id"])["state"] == "ready"
    worker = spawn_worker(bench.url, "leased", "hold", {"ttl": 1})
    assert worker.stdout is not None and worker.stdout.readline().strip() == "attached"
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    deadline = time.monotonic() + 15
    while (status := bench.settle("leased"))["leases"]:
        assert time.monotonic() < deadline, "the dead worker's lease never expired"
        time.sleep(0.1)
    assert httpx.delete(f"{bench.url}/v1/models/leased").status_code == 204
    return f"{status['state']}:leases={status['leases']}"


def cancel_mid_load(bench: Bench) -> str:
    body = {
        "source": str(bench.models / "big"),
        "name": "cancelled",
        "dtype": "float32",
        "offload": True,
        "device_map": LLAMA_LAYERS_ON_DISK,
    }
    assert bench.post(**body).status_code == 202
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{bench.url}/v1/models/cancelled").json())["state"] != "loading":
        assert status["state"] == "queued" and time.monotonic() < deadline, status["error"]
        time.sleep(0.01)
    assert httpx.delete(f"{bench.url}/v1/models/cancelled").status_code == 202
    return str(bench.settle("cancelled")["state"])


ROWS: dict[str, tuple[Callable[[Bench], str], str]] = {
    "corrupt-shard": (corrupt_shard, "failed:invalid_checkpoint"),
    "truncated-shard": (truncated_shard, "failed:invalid_checkpoint"),
    "missing-config": (missing_config, "failed:invalid_checkpoint"),
    "missing-shard-of-index": (missing_shard, "failed:invalid_checkpoint"),
    "wrong-task": (wrong_task, "failed:wrong_model_type"),
    "remote-code": (remote_code, "refused:403:remote_code_refused"),
    "traversal": (traversal, "refused:403:source_not_allowed"),
    "symlinked-file": (symlinked_file, "refused:403:source_not_allowed"),
    "admission-refusal": (admission_refusal, "refused:507:insufficient_memory"),
    "oom-during-load": (oom_during_load, "failed:out_of_memory"),
    "worker-sigkill-with-lease": (worker_sigkill_with_lease, "ready:leases=0"),
    "cancel-mid-load": (cancel_mid_load, "gone"),
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Bench]:
    tmp = tmp_path_factory.mktemp("faults")
    models = tmp / "models"
    shutil.copytree(models_root / "llama", models / "llama")
    checkpoints.llama_100m(models / "big")
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(models)]),
        "BASEHOLD_LEASE_REAP_SECONDS": "0.2",
    }
    server = start(tmp, [], env=env)
    bench = Bench(server, models, tmp / "state", tmp)
    # Warm up the code paths a first load allocates for good.
    answer = bench.post(source=str(models / "llama"), name="warmup", dtype="float32")
    assert bench.settle(answer.json()["id"])["state"] == "ready"
    assert httpx.delete(f"{server.url}/v1/models/warmup").status_code == 204
    yield bench
    assert server.stop() == 0


@dataclass(frozen=True)
class Footprint:
    rss: int  # the serving process's
    shared: int  # shared memory the service's processes hold (tests/shared_memory.py)
    arenas: int  # arena memfds the serving process keeps open
    offload: list[str]  # offload folders


def footprint(bench: Bench) -> Footprint:
    pid = bench.server.pid
    return Footprint(
        rss=psutil.Process(pid).memory_info().rss,
        shared=held_shared_memory(pid),
        arenas=len(arena_fds(pid)),
        offload=sorted(p.name for p in (bench.state / "offload").iterdir()),
    )


def assert_left_nothing(bench: Bench, before: Footprint) -> None:
    """Nothing the row allocated is left: the shared memory, once a loader that just
    failed has exited with what it had made, is back within SHARED_SLACK."""
    pid, deadline = bench.server.pid, time.monotonic() + 30
    while (grown := held_shared_memory(pid) - before.shared) >= SHARED_SLACK:
        assert time.monotonic() < deadline, f"shared memory grew {grown} B:\n{describe(pid)}"
        time.sleep(0.05)
    after = footprint(bench)
    assert after.rss - before.rss < 40 * MiB, f"RSS grew {(after.rss - before.rss) / MiB:.0f} MiB"
    assert (after.arenas, after.offload) == (before.arenas, before.offload)


@pytest.mark.parametrize("row", list(ROWS))
def test_fault_matrix(bench: Bench, row: str) -> None:
    action, expected = ROWS[row]
    before = footprint(bench)
    assert action(bench) == expected
    assert_left_nothing(bench, before)
    assert httpx.get(f"{bench.url}/healthz").status_code == 200
    assert httpx.get(f"{bench.url}/v1/models").json()["models"] == []
    assert "Traceback" not in bench.server.output()


def test_shared_memory_of_other_processes_does_not_fail_a_row(bench: Bench) -> None:
    """Another process takes 256 MiB of shared memory (a memfd and a /dev/shm file) while
    a row runs: only the service's own memory is measured, so the row still passes."""
    before = footprint(bench)
    outsider = f"/dev/shm/basehold-faults-{os.getpid()}"
    with holding(f"fd:memfd:{128 * MiB}", f"fd:{outsider}:{128 * MiB}"):
        assert corrupt_shard(bench) == "failed:invalid_checkpoint"
        assert_left_nothing(bench, before)


def test_an_arena_the_service_keeps_is_measured(bench: Bench) -> None:
    """What the matrix would see of a leaked arena: one the service still holds counts at
    its size, and is gone from the measure once the model is unloaded."""
    before = footprint(bench)
    answer = bench.post(source=str(bench.models / "llama"), name="kept", dtype="float32")
    assert bench.settle(answer.json()["id"])["state"] == "ready"
    [arena] = arena_fds(bench.server.pid).values()
    size = arena.stat().st_blocks * 512
    assert size > SHARED_SLACK  # had it leaked, the matrix would see it
    assert held_shared_memory(bench.server.pid) - before.shared == size
    assert httpx.delete(f"{bench.url}/v1/models/kept").status_code == 204
    assert_left_nothing(bench, before)
