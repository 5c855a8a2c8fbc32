"""The keeper, for real: `basehold serve --keeper` runs the service as a child of a small
stdlib process, which starts it again after a SIGKILL with the models' memory, the
listening sockets and the leases it held, and hands over to a new child on SIGHUP."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.common.protocol.keeper import network_namespace
from service.common.protocol.wire import close_fds
from service.keeper import Holdings
from service.worker.client import Client
from tests.conftest import until
from tests.serving.handover.test_takeover import gone, lease, serving_pid
from tests.serving.state.test_restart import env_for, post
from tests.serving.test_server_e2e import start, wait_ready

pytestmark = pytest.mark.e2e
TOKENS = torch.tensor([[1, 5, 9, 42, 7, 3]])


class Polls(threading.Thread):
    """GET /healthz on a new connection every 20 ms: what a client sees meanwhile (a
    request the killed process had accepted is dropped with it; none is refused)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.refused = 0
        self.dropped = 0
        self.answered = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                httpx.get(f"{self.url}/healthz", timeout=60)
                self.answered += 1
            except httpx.ConnectError:
                self.refused += 1
            except httpx.TransportError:  # in flight in the process that was killed
                self.dropped += 1
            time.sleep(0.02)


def health(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/healthz", timeout=30).json()
    return body


def restarts(url: str) -> int | None:
    """How often the keeper started its child, or None for a poll the killed child had
    accepted (dropped with it)."""
    try:
        count: int = health(url)["restarts"]
    except httpx.TransportError:
        return None
    return count


def forkers() -> list[int]:
    """The loader templates running now, but the tests' shared one."""
    shared = os.environ.get("BASEHOLD_LOADER_TEMPLATE", "\0")
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_text()
        except (FileNotFoundError, NotADirectoryError, PermissionError, ProcessLookupError):
            continue
        if (
            "service.loader.forker" in cmdline
            and shared not in cmdline
            and not gone(int(entry.name))
        ):
            found.append(int(entry.name))
    return found


def libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_keeper_starts_a_killed_service_again_with_its_models(
    tmp_path: Path, models_root: Path
) -> None:
    # Each child its own loader template, as in production: a runner's outlives its child.
    env = env_for(models_root, BASEHOLD_LOADER_TEMPLATE="")
    keeper = start(tmp_path, ["--keeper"], env=env)
    children: list[int] = []
    try:
        first = serving_pid(keeper.url)
        children.append(first)
        assert first != keeper.pid and health(keeper.url)["restarts"] == 0
        maps = libraries(keeper.pid)  # the standard library alone
        assert "libtorch" not in maps and "pydantic_core" not in maps, maps
        post(keeper, source=str(models_root / "llama"), name="a", dtype="float32")
        before = wait_ready(keeper.url, "a")
        eight = {"method": "bnb-8bit"}  # not shareable: its runner holds it
        post(keeper, source=str(models_root / "gpt2"), name="r", quantization=eight)
        runner = wait_ready(keeper.url, "r")["timings"]["ready_at"]
        held = lease(keeper.url, "a", "trainer-1")
        arena = held["handle"]["arena"]["name"]
        polls = Polls(keeper.url)
        polls.start()
        with Client(keeper.url).attach("a", holder="worker", ttl_seconds=30) as model:
            with torch.no_grad():
                logits = model(TOKENS).logits

            os.kill(first, signal.SIGKILL)
            until(lambda: restarts(keeper.url) == 1, "the keeper starts it again")
            second = serving_pid(keeper.url)
            children.append(second)
            status = wait_ready(keeper.url, "a")
            assert status["timings"]["ready_at"] == before["timings"]["ready_at"]
            # The runner and its template outlived the child that started them.
            assert wait_ready(keeper.url, "r")["timings"]["ready_at"] == runner
            assert lease(keeper.url, "a", "trainer-2")["handle"]["arena"]["name"] == arena
            renewed = httpx.post(
                f"{keeper.url}/v1/leases/{held['lease_id']}/renew",
                headers={"X-Lease-Secret": held["secret"]},
            )
            assert renewed.status_code == 200, renewed.text
            with torch.no_grad():
                assert torch.equal(model(TOKENS).logits, logits)
        polls.stop.set()
        polls.join(60)
        assert polls.refused == 0 and polls.answered > 0
        assert "started again by the keeper: 2 model(s) kept" in keeper.output()

        # SIGHUP to the keeper: a new child takes over from the running one.
        keeper.process.send_signal(signal.SIGHUP)
        until(
            lambda: health(keeper.url)["taken_over_from"] == second,
            "a new child took over",
        )
        children.append(serving_pid(keeper.url))
        until(lambda: gone(second), "the old child exits")
        assert wait_ready(keeper.url, "a")["timings"]["ready_at"] == before["timings"]["ready_at"]

        # A crash after that: the models came back to the keeper from the new child.
        os.kill(children[-1], signal.SIGKILL)
        until(lambda: restarts(keeper.url) == 2, "the keeper starts it again")
        children.append(serving_pid(keeper.url))
        assert wait_ready(keeper.url, "a")["timings"]["ready_at"] == before["timings"]["ready_at"]
        assert wait_ready(keeper.url, "r")["timings"]["ready_at"] == runner
        templates = forkers()
        assert len(templates) >= 2  # the runner's, and the child's own

        # SIGTERM to the keeper: the child drains and both exit 0; so do the runner and
        # every template.
        assert keeper.stop() == 0
        assert all(gone(pid) for pid in children)
        until(lambda: all(gone(pid) for pid in templates), "the templates exit")
    finally:
        if keeper.process.poll() is None:
            keeper.stop()
        for pid in children:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_kept_service_that_hands_over_elsewhere_is_not_started_again(
    tmp_path: Path, models_root: Path
) -> None:
    """`serve --take-over` beside a kept basehold: the child hands over, tells its keeper,
    which keeps nothing more and exits with it instead of starting it again."""
    env = env_for(models_root)
    keeper = start(tmp_path, ["--keeper"], env=env)
    successor = None
    try:
        child = serving_pid(keeper.url)
        post(keeper, source=str(models_root / "llama"), name="a", dtype="float32")
        before = wait_ready(keeper.url, "a")
        port = int(keeper.url.rsplit(":", 1)[1])
        successor = start(tmp_path, ["--take-over"], env=env, port=port, ready=False)
        assert keeper.process.wait(timeout=120) == 0
        assert gone(child)
        assert "handed over; keeping nothing more" in keeper.output()
        assert "starting it again" not in keeper.output()
        until(lambda: serving_pid(keeper.url) == successor.pid, "the successor serves")
        assert wait_ready(keeper.url, "a")["timings"]["ready_at"] == before["timings"]["ready_at"]
    finally:
        for server in (keeper, successor):
            if server is not None and server.process.poll() is None:
                server.stop()


def _memfd(size: int = 4096) -> int:
    fd = os.memfd_create("kept")
    os.ftruncate(fd, size)
    return fd


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


VERSIONS = {"handover": 1, "state_schema": 3, "handle": 5, "protocol": 2}


def test_kept_models_are_offered_only_to_a_child_of_the_same_versions() -> None:
    holdings = Holdings()
    try:
        arena = _memfd()
        holdings.keep({"id": "a", "fds": 1}, [arena], dict(VERSIONS))
        same = {**VERSIONS, "netns": network_namespace()}
        offer, fds = holdings.offer(same, 1)
        assert [m["id"] for m in offer["models"]] == ["a"] and len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(arena).st_ino  # the same memory
        close_fds(fds)
        newer = {**same, "state_schema": 4}
        offer, fds = holdings.offer(newer, 1)
        assert offer["models"] == [] and fds == []  # it loads them again
    finally:
        holdings.close()
    assert _closed(arena)


def test_the_keeper_lets_go_of_what_is_dropped_or_kept_again() -> None:
    holdings = Holdings()
    first, second, other = _memfd(), _memfd(), _memfd()
    holdings.keep({"id": "a", "fds": 1}, [first], dict(VERSIONS))
    holdings.keep({"id": "b", "fds": 1}, [other], dict(VERSIONS))
    holdings.keep({"id": "a", "fds": 1}, [second], dict(VERSIONS))  # adopted again
    assert _closed(first) and not _closed(second)
    holdings.drop("b")
    assert _closed(other)
    http, worker = socket.socket(), socket.socket()
    holdings.listeners({"http": True, "worker": True}, [http.detach(), worker.detach()])
    assert holdings.http is not None and holdings.worker is not None
    kept = [holdings.http, holdings.worker]
    holdings.listeners({"http": False, "worker": True}, [_memfd()])  # a new child's
    assert all(_closed(fd) for fd in kept) and holdings.http is None
    holdings.close()
    assert _closed(second)
