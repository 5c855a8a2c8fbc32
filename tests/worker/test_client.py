"""service.worker.client against a live server: jobs that start before their base exists, ensure
(load-if-absent, one load for many jobs), attach by spec, and why a lease was lost."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.worker.client import BaseholdError, Client, lease_of
from tests.conftest import until
from tests.serving.test_server_e2e import Server

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(live_server: Server) -> Server:
    return live_server


def spec(models_root: Path, **extra: Any) -> dict[str, Any]:
    return {"source": str(models_root / "llama"), "dtype": "float32", **extra}


def loads_done(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("basehold_load_seconds_count"))
    return float(line.split()[-1])


def test_a_job_started_before_its_model_exists_waits_for_it(
    server: Server, models_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="basehold.client")
    got: dict[str, Any] = {}
    waiters = [
        threading.Thread(target=lambda: got.update(files=Client(server.url).files("later"))),
        threading.Thread(
            target=lambda: got.update(
                status=Client(server.url).wait("later", timeout=60, absent_ok=True)
            )
        ),
    ]
    for waiter in waiters:
        waiter.start()
    until(lambda: caplog.text.count("does not exist yet") >= 2, "the waiters said so")
    assert "Client.ensure" in caplog.text
    Client(server.url).load(**spec(models_root, name="later"))
    for waiter in waiters:
        waiter.join(timeout=120)
    assert got["status"]["state"] == "ready"
    assert (got["files"] / "config.json").is_file()
    with pytest.raises(BaseholdError) as absent:  # without absent_ok: at once, as before
        Client(server.url).wait("never")
    assert absent.value.code == "model_not_found"
    with pytest.raises(TimeoutError, match="still absent"):
        Client(server.url).wait("never", timeout=0.5, absent_ok=True)


def test_ensure_loads_once_for_many_jobs_and_raises_a_failed_loads_problem(
    server: Server, models_root: Path
) -> None:
    request = spec(models_root, name="shared")
    got: list[dict[str, Any]] = []
    jobs = [
        threading.Thread(target=lambda: got.append(Client(server.url).ensure(request)))
        for _ in range(3)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [s["state"] for s in got] == ["ready"] * 3
    assert {s["id"] for s in got} == {"shared"}
    assert loads_done(server) == 1
    assert Client(server.url).ensure(request)["id"] == "shared"
    assert loads_done(server) == 1
    with pytest.raises(BaseholdError) as failed:  # a Llama has no seq2seq head
        Client(server.url).ensure(spec(models_root, task="seq2seq-lm"))
    assert failed.value.code == "wrong_model_type"


def test_attach_by_spec_and_why_the_lease_ended(server: Server, models_root: Path) -> None:
    client = Client(server.url)
    tokens = torch.tensor([[1, 5, 9, 2]])
    with client.attach(spec=spec(models_root, name="by-spec"), ttl_seconds=3) as model:
        lease = lease_of(model)
        assert lease.model_id == "by-spec" and lease.state == "active"
        with torch.no_grad():
            model(tokens)
    assert (lease.state, lease.reason) == ("released", "released")
    with (
        pytest.raises(ValueError, match="not 'other'"),
        client.attach("other", spec=spec(models_root, name="by-spec")),
    ):
        pass
    with client.attach("by-spec", ttl_seconds=3) as model:
        lease = lease_of(model)
        client.unload("by-spec", force=True)
        until(lambda: lease.lost, "the renewer heard the lease ended", timeout=30)
        assert lease.reason == "unloaded"
        assert "its model was unloaded" in str(lease.detail)
