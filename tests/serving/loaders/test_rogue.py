"""What a loader says is checked: a manifest cannot choose the socket or uid workers are
sent to, a message the service cannot read ends that load (never the service) and closes
every fd it brought, and any number of threads may wait on one loader's end.

The loaders here are real processes forked from a real template (forked in turn from the
worker zygote: tests/serving/loaders/templates.py), which imported
`tests.serving.loaders.rogue`: jobs named after a behaviour there misbehave on purpose."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.common.errors import BaseholdError
from service.common.load.progress import Progress
from service.common.load.spec import LoadRequest
from service.serving.loaders.loaders import Loaders, LoaderSetup
from tests.conftest import until
from tests.serving.loaders import rogue
from tests.serving.loaders.templates import start_template


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(scope="module")
def rogue_template() -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="bh-rogue-"))
    address = folder / "template.sock"
    running = start_template(address, BASEHOLD_LOADER_PRELOAD="tests.serving.loaders.rogue")
    running.wait_preloaded()  # the rogue loaders are in
    yield str(address)
    running.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def loaders(rogue_template: str, tmp_path: Path) -> Iterator[Loaders]:
    setup = LoaderSetup(
        roots=[tmp_path],
        offload_root=tmp_path / "offload",
        socket=tmp_path / "ours.sock",
        cuda=None,
        template=rogue_template,
    )
    made = Loaders(setup)
    made.warm()  # its watch on the template is open before a test counts fds
    yield made
    made.close()


def _spec(tmp_path: Path) -> LoadRequest:
    return LoadRequest(source=str(tmp_path))


def test_a_manifest_cannot_name_another_socket_or_uid(loaders: Loaders, tmp_path: Path) -> None:
    loader = loaders.start("rogue-liar", "load-liar", _spec(tmp_path), None, True)
    held = loaders.drive(loader, Progress(), lambda estimate: None)
    try:
        handle = held.placed.handle
        assert handle is not None
        # What a worker is told comes from this process, whatever the loader claimed.
        assert handle.arena.socket == str(tmp_path / "ours.sock") != rogue.SOCKET_CLAIMED
        assert handle.socket_uid == os.getuid() != rogue.UID_CLAIMED
        # Where its small files are served from: the service's roots, not the loader's "/".
        assert held.allowed == (tmp_path.resolve(),)
    finally:
        loader.kill()
        loaders.discard("load-liar")


@pytest.mark.parametrize(
    "behaviour",
    ["rogue-wrong-fields", "rogue-wrong-type", "rogue-wrong-fd-count", "rogue-outside"],
)
def test_a_message_the_service_cannot_read_fails_that_load_and_closes_its_fds(
    loaders: Loaders, tmp_path: Path, behaviour: str
) -> None:
    before = _open_fds()
    loader = loaders.start(behaviour, f"load-{behaviour}", _spec(tmp_path), None, True)
    failure: list[BaseException] = []

    def drive() -> None:
        try:
            loaders.drive(loader, Progress(), lambda estimate: None)
        except BaseException as exc:
            failure.append(exc)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    driver.join(30)
    assert not driver.is_alive(), "the bad message was never noticed"
    assert isinstance(failure[0], BaseholdError), repr(failure[0])
    assert failure[0].code == "loader_crashed"
    assert "cannot read" in failure[0].message
    assert loader.wait(10) is not None  # the loader is gone too
    loader.close()
    loaders.discard(f"load-{behaviour}")
    until(lambda: _open_fds() <= before, f"fds left open: {_open_fds() - before}", 10)


def test_threads_waiting_on_one_loader_all_see_it_end(loaders: Loaders, tmp_path: Path) -> None:
    """An unload (stop) and a runner's watcher (wait) used to race on the status socket:
    the one that lost read a closed socket and raised, leaving a model `unloading`."""
    loader = loaders.start("rogue-linger", "load-linger", _spec(tmp_path), None, True)
    seen: list[int | None] = []
    errors: list[BaseException] = []
    started = threading.Barrier(9)

    def waiter() -> None:
        started.wait()
        try:
            while (code := loader.wait(0)) is None:
                pass
            seen.append(code)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    started.wait()
    # Switch threads as often as the interpreter can: the waiters interleave at every
    # bytecode, as they may on a busy node.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        loader.stop(timeout=5)  # what an unload does: close the channel; it exits
        for thread in threads:
            thread.join(30)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert len(seen) == 8 and len(set(seen)) == 1
    assert loader.wait(0) == seen[0]
    loaders.discard("load-linger")
