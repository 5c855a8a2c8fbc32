"""Every read on the loader protocol has a deadline: a loader that stops talking is killed
and its load fails `loader_stalled`; a template that does not answer fails the spawn in
time; one slow requester does not hold up the template for everyone else."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.common.errors import BaseholdError
from service.common.load.spec import LoadRequest
from service.serving.loaders.loaders import Loaders, LoaderSetup
from tests.conftest import ClientFactory, until, wait_for
from tests.serving.loaders.test_loaders import _gone, _start, frozen_loader


def test_a_stalled_loader_is_killed_and_its_load_fails_loader_stalled(
    make_client: ClientFactory, models_root: Path
) -> None:
    client = make_client(loader_stall_seconds=5)
    with frozen_loader(client) as frozen:  # SIGSTOP at its first message: it says no more
        model_id, pid = _start(client, frozen, source=str(models_root / "llama"))
        failed = wait_for(client, model_id, ("failed",), timeout=30)
    assert failed["error"]["code"] == "loader_stalled"
    assert "BASEHOLD_LOADER_STALL_SECONDS" in failed["error"]["message"]
    until(lambda: _gone(pid), "the stalled loader still runs", 10)
    # The next load of it works.
    again = client.post("/v1/models", json={"source": str(models_root / "llama")})
    assert wait_for(client, again.json()["id"])["state"] == "ready"


@pytest.fixture
def silent_template() -> Iterator[Path]:
    """A socket of this user's that accepts and reads, and never answers."""
    folder = Path(tempfile.mkdtemp(prefix="bh-silent-"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(folder / "template.sock"))
    listener.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield folder / "template.sock"
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    for conn in held:
        conn.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_a_template_that_never_answers_fails_the_spawn_in_time(
    silent_template: Path, tmp_path: Path, models_root: Path
) -> None:
    setup = LoaderSetup(
        roots=[models_root],
        offload_root=tmp_path,
        socket=tmp_path / "s.sock",
        cuda=None,
        template=str(silent_template),
        reply_seconds=1,
    )
    loaders = Loaders(setup)
    outcome: list[BaseException] = []

    def estimate() -> None:
        try:
            loaders.estimate(LoadRequest(source=str(models_root / "llama")), None, full=False)
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    asking = threading.Thread(target=estimate, daemon=True)
    asking.start()
    asking.join(20)
    assert not asking.is_alive(), "the spawn still waits for a template that never answers"
    assert time.monotonic() - started < 10
    assert isinstance(outcome[0], BaseholdError) and outcome[0].code == "loader_unavailable"
    loaders.close()


def test_a_slow_requester_does_not_hold_up_the_template(tmp_path: Path, models_root: Path) -> None:
    """One connection that sends nothing (a stuck or hostile requester of this uid) while
    another asks for an estimate: the template serves the second at once."""
    shared = os.environ["BASEHOLD_LOADER_TEMPLATE"]
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(shared)
    try:
        setup = LoaderSetup(
            roots=[models_root],
            offload_root=tmp_path,
            socket=tmp_path / "s.sock",
            cuda=None,
            template=shared,
        )
        loaders = Loaders(setup)
        answered: list[object] = []
        spec = LoadRequest(source=str(models_root / "llama"))
        asking = threading.Thread(
            target=lambda: answered.append(loaders.estimate(spec, None, full=False)), daemon=True
        )
        asking.start()
        asking.join(15)
        assert answered, "the template is still stuck on the slow requester"
        loaders.close()
    finally:
        slow.close()
