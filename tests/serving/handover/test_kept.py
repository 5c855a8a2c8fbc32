"""The serving process's link to its keeper: the registry's listener never waits for the
keeper (it runs under the registry's lock); messages still arrive in order."""

from __future__ import annotations

import os
import socket
import threading

from service.common.load.spec import LoadRequest
from service.common.protocol.wire import Channel
from service.serving.handover.kept import PENDING, KeeperLink
from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State
from tests.conftest import until

DROPS = 300  # far more than a small socket buffer holds


def test_a_keeper_that_does_not_read_never_stops_the_registry() -> None:
    ours, keepers = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    link = KeeperLink(Channel(ours))
    records = [
        ModelRecord(id=f"m{i}", name=None, spec=LoadRequest(source="/models/m"), key="k")
        for i in range(DROPS)
    ]

    def let_go() -> None:  # as the registry calls it, under its lock
        for record in records:
            link.on_transition(record, State.READY, State.UNLOADING)

    letting_go = threading.Thread(target=let_go, daemon=True)
    letting_go.start()
    letting_go.join(30)
    stuck = letting_go.is_alive()
    keeper = Channel(keepers)
    got = [keeper.recv(30)[0] for _ in range(DROPS)]  # the keeper reads at last
    assert not stuck
    assert got == [{"type": "drop", "id": f"m{i}"} for i in range(DROPS)]

    handing = threading.Thread(target=link.handed_over, daemon=True)
    handing.start()
    assert keeper.recv(30)[0] == {"type": "handed_over"}
    handing.join(30)
    assert not handing.is_alive()
    link.close()
    keepers.close()


def test_a_keeper_that_never_reads_is_let_go_with_what_was_queued_for_it() -> None:
    """Past PENDING unread messages the link is lost: what was queued (fds too) is let go,
    nothing more is queued, and the registry side never waited."""
    ours, keepers = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    link = KeeperLink(Channel(ours))
    held = os.memfd_create("kept-test")
    before = _open_fds()
    try:
        for _ in range(PENDING + 10):  # each queued with a new fd of `held`
            link.listeners(None, os.dup(held))
        until(lambda: _open_fds() <= before, "the queued fds let go")
        link.listeners(None, os.dup(held))  # the link is lost: nothing more is queued
        assert _open_fds() <= before
    finally:
        os.close(held)
        link.close()
        keepers.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
