"""Handover, for real: `basehold serve --take-over` and SIGHUP pass the held models, leases
and sockets to a successor process without loading anything again; a refused or cut
handover loses nothing."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.common.protocol.wire import Channel, close_fds
from service.serving.handover.messages import (
    SOCKET_NAME,
    Hello,
    Offer,
    Refused,
    Taken,
    ToSuccessor,
)
from service.serving.state.database import SCHEMA_VERSION
from service.worker.client import Client
from tests.conftest import until
from tests.serving.state.test_restart import db_models, env_for, post
from tests.serving.test_server_e2e import Server, start, wait_ready

pytestmark = pytest.mark.e2e
TOKENS = torch.tensor([[1, 5, 9, 42, 7, 3]])


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def lease(url: str, model_id: str, holder: str) -> dict[str, Any]:
    answer = httpx.post(
        f"{url}/v1/models/{model_id}/leases", json={"holder": holder, "ttl_seconds": 60}
    )
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


def renews(url: str, held: dict[str, Any]) -> None:
    """The lease `held` (granted by whichever process) renews at `url`."""
    renewed = httpx.post(
        f"{url}/v1/leases/{held['lease_id']}/renew",
        headers={"X-Lease-Secret": held["secret"]},
    )
    assert renewed.status_code == 200, renewed.text


def serving_pid(url: str) -> int:
    pid: int = httpx.get(f"{url}/healthz", timeout=10).json()["serving_pid"]
    return pid


def answers(url: str) -> int | None:
    """The pid serving `url`, or None while nothing does."""
    try:
        return serving_pid(url)
    except httpx.TransportError:
        return None


def connect(tmp_path: Path) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(tmp_path / "state" / SOCKET_NAME))
    return Channel(sock)


def memfds(pid: int) -> int:
    """How many memfds (arenas) `pid` holds open."""
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd).startswith("/memfd:")
        except FileNotFoundError:
            continue
    return count


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def template_and_runner(server: Server) -> tuple[int, int]:
    """The loader template `server` started and the one runner forked from it."""
    (template,) = [
        pid
        for pid in children(server.pid)
        if "service.loader.forker" in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    (runner,) = [pid for pid in children(template) if not gone(pid)]
    return template, runner


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_a_successor_takes_models_leases_and_sockets_and_a_worker_trains_through_it(
    tmp_path: Path, models_root: Path
) -> None:
    # Each its own loader template, as in production: the runner's outlives its service.
    env = env_for(models_root, BASEHOLD_LOADER_TEMPLATE="")
    old = start(tmp_path, [], env=env)
    successor: int | None = None
    try:
        post(old, source=str(models_root / "llama"), name="a", dtype="float32")
        before = wait_ready(old.url, "a")
        eight = {"method": "bnb-8bit"}  # not shareable: its runner holds it
        post(old, source=str(models_root / "gpt2"), name="r", quantization=eight)
        runner = wait_ready(old.url, "r")
        assert runner["state"] == "ready" and not runner["shareable"], runner
        template, runner_pid = template_and_runner(old)
        held = lease(old.url, "a", "trainer-1")
        arena = held["handle"]["arena"]["name"]  # names the load: a new load, a new name
        with Client(old.url).attach("a", holder="worker", ttl_seconds=30) as model:
            with torch.no_grad():
                logits = model(TOKENS).logits

            new = start(tmp_path, ["--take-over"], env=env, port=port_of(old), ready=False)
            assert old.process.wait(timeout=120) == 0
            until(lambda: serving_pid(old.url) == new.pid, "the successor serves")
            health = httpx.get(f"{new.url}/healthz").json()
            assert health["taken_over_from"] == old.pid
            status = wait_ready(new.url, "a")
            assert status["state"] == "ready"
            assert status["timings"]["ready_at"] == before["timings"]["ready_at"]
            assert "taking over from pid" in new.output()
            assert "2 model(s) handed over" in new.output()
            assert f"serving 2 model(s) handed over by pid {old.pid}" in new.output()
            # The runner's model is handed over with its process (and the template it was
            # forked from, which outlives the process that started it).
            kept = wait_ready(new.url, "r")
            assert kept["state"] == "ready", kept
            assert kept["timings"]["ready_at"] == runner["timings"]["ready_at"]
            assert not gone(runner_pid) and not gone(template)
            # The same lease, renewed by the successor; the same memory lent again.
            renews(new.url, held)
            assert lease(new.url, "a", "trainer-2")["handle"]["arena"]["name"] == arena
            # The worker attached before the handover goes on with its mapping.
            with torch.no_grad():
                assert torch.equal(model(TOKENS).logits, logits)
        attached = Client(new.url).attach("a", holder="after", ttl_seconds=30)
        with attached as again, torch.no_grad():
            assert torch.equal(again(TOKENS).logits, logits)

        # SIGHUP: the running one starts a fresh copy of itself, which takes over.
        new.process.send_signal(signal.SIGHUP)
        assert new.process.wait(timeout=120) == 0
        until(lambda: serving_pid(new.url) != new.pid, "the SIGHUP successor serves")
        successor = serving_pid(new.url)
        assert wait_ready(new.url, "a")["timings"]["ready_at"] == before["timings"]["ready_at"]
        assert lease(new.url, "a", "trainer-3")["handle"]["arena"]["name"] == arena
        assert "SIGHUP: started pid" in new.output()
        # The runner, handed over a second time, then unloaded: it and its template end.
        assert wait_ready(new.url, "r")["timings"]["ready_at"] == runner["timings"]["ready_at"]
        assert db_models(tmp_path) == {"a": "ready", "r": "ready"}
        assert not gone(runner_pid)
        assert httpx.delete(f"{new.url}/v1/models/r", timeout=30).status_code == 204
        until(lambda: gone(runner_pid) and gone(template), "the runner and its template end")
        assert db_models(tmp_path) == {"a": "ready"}
    finally:
        for server in (old,):
            if server.process.poll() is None:
                server.kill()
        if successor is not None and not gone(successor):
            os.kill(successor, signal.SIGTERM)
            until(lambda: gone(successor), "the successor exits")


def test_a_refused_or_cut_handover_loses_nothing(tmp_path: Path, models_root: Path) -> None:
    env = env_for(models_root)
    old = start(tmp_path, [], env=env)
    new: Server | None = None
    try:
        post(old, source=str(models_root / "llama"), name="a", dtype="float32")
        wait_ready(old.url, "a")
        eight = {"method": "bnb-8bit"}  # a runner holds it
        post(old, source=str(models_root / "gpt2"), name="r", quantization=eight)
        assert wait_ready(old.url, "r")["state"] == "ready"
        held = lease(old.url, "a", "trainer-1")
        arenas = memfds(old.pid)
        assert arenas >= 1

        # Another state schema: refused before anything stops.
        channel = connect(tmp_path)
        channel.send(Hello.ours().model_copy(update={"state_schema": SCHEMA_VERSION + 1}))
        answer, fds = channel.receive(ToSuccessor, 30)
        channel.close()
        assert isinstance(answer, Refused) and not fds
        assert "state database schema" in answer.reason
        post(old, source=str(models_root / "gpt2"), name="b", dtype="float32")
        assert wait_ready(old.url, "b")["state"] == "ready"

        # A successor that takes the offer and dies before it says Taken: nothing changed
        # hands; the old one serves and records changes as before, its fds all its own.
        # (From another PID namespace, a pod's: the runner, which ends with this one's
        # namespace, is not offered.)
        arenas = memfds(old.pid)
        channel = connect(tmp_path)
        channel.send(Hello.ours().model_copy(update={"pidns": "pid:[1]"}))
        offer, fds = channel.receive(ToSuccessor, 60)
        assert isinstance(offer, Offer) and offer.http
        assert sorted(m.id for m in offer.models) == ["a", "b"]
        assert len(fds) == offer.fd_count
        refused = httpx.delete(f"{old.url}/v1/models/b")  # changes wait; reads are answered
        assert refused.status_code == 503 and refused.json()["code"] == "handing_over"
        assert refused.headers["retry-after"] == "1"
        assert httpx.get(f"{old.url}/v1/models/b").json()["state"] == "ready"
        close_fds(fds)
        channel.close()
        until(
            lambda: httpx.delete(f"{old.url}/v1/models/b").status_code == 204,
            "changes are answered again",
        )
        until(lambda: "b" not in db_models(tmp_path), "the unload is recorded")
        assert memfds(old.pid) == arenas - 1
        assert old.process.poll() is None

        # A successor that says Taken and then dies: the old one has let go; the state
        # database is as it was frozen, and a start (with --take-over: nothing to take
        # over any more) restores the model and its lease.
        channel = connect(tmp_path)
        channel.send(Hello.ours())
        offer, fds = channel.receive(ToSuccessor, 60)
        assert isinstance(offer, Offer) and [m.id for m in offer.models] == ["a", "r"]
        assert offer.models[1].runner is not None
        channel.send(Taken())
        assert old.process.wait(timeout=120) == 0
        close_fds(fds)
        channel.close()
        assert db_models(tmp_path) == {"a": "ready", "r": "ready"}
        new = start(tmp_path, ["--take-over"], env=env, port=port_of(old))
        assert "no basehold serves this state directory; starting as usual" in new.output()
        assert wait_ready(new.url, "a")["state"] == "ready"
        assert wait_ready(new.url, "r")["state"] == "ready"  # its runner ended: loaded again
        renews(new.url, held)
    finally:
        for server in (old, new):
            if server is not None and server.process.poll() is None:
                server.stop()


def _connections(path: Path) -> int:
    """Sockets /proc/net/unix lists at `path`: its listener, and each connection to it
    (accepted or waiting to be)."""
    rows = Path("/proc/net/unix").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[-1] == str(path))


def test_a_successor_whose_predecessor_is_killed_midway_starts_as_usual(
    tmp_path: Path, models_root: Path
) -> None:
    """The running one is SIGKILLed while a successor waits for its offer: the successor
    hears the end, takes the port and the lock the kernel let go, and restores."""
    env = env_for(models_root)
    old = start(tmp_path, [], env=env)
    new: Server | None = None
    try:
        post(old, source=str(models_root / "llama"), name="a", dtype="float32")
        wait_ready(old.url, "a")
        held = lease(old.url, "a", "trainer-1")
        first = connect(tmp_path)  # holds the running one in a handover (one at a time)
        first.send(Hello.ours())
        offer, fds = first.receive(ToSuccessor, 60)
        assert isinstance(offer, Offer)
        close_fds(fds)
        path = tmp_path / "state" / SOCKET_NAME
        listed = _connections(path)
        new = start(tmp_path, ["--take-over"], env=env, port=port_of(old), ready=False)
        until(lambda: _connections(path) > listed, "the successor waits for its offer")
        old.kill()
        first.close()
        until(lambda: answers(old.url) == new.pid, "the successor serves")
        assert "went away before it answered: starting as usual" in new.output()
        assert wait_ready(new.url, "a")["state"] == "ready"
        renews(new.url, held)
    finally:
        for server in (old, new):
            if server is not None and server.process.poll() is None:
                server.stop()
