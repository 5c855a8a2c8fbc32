"""The loader channel: JSON messages with fds, and what the reader sees when the other
side goes away."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from service.errors import InsufficientMemory, LoaderCrashed, relayed
from service.loaders.wire import Channel, ChannelClosed


def test_messages_and_fds_arrive_in_order() -> None:
    left, right = (Channel(s) for s in socket.socketpair())
    fd = os.memfd_create("arena")
    os.write(fd, b"weights")
    left.send({"type": "progress", "bytes_done": 1})
    left.send({"type": "ready", "facts": {"x": "y" * 200_000}}, [fd])
    left.send({"type": "after"})
    os.close(fd)
    assert right.recv() == ({"type": "progress", "bytes_done": 1}, [])
    message, fds = right.recv()
    assert message["facts"]["x"] == "y" * 200_000 and len(fds) == 1
    assert os.pread(fds[0], 7, 0) == b"weights"
    os.close(fds[0])
    assert right.recv() == ({"type": "after"}, [])
    left.close()
    with pytest.raises(ChannelClosed):
        right.recv()
    right.close()


def test_closing_wakes_a_blocked_reader() -> None:
    left, right = (Channel(s) for s in socket.socketpair())
    woke: list[BaseException] = []

    def read() -> None:
        try:
            right.recv()
        except BaseException as exc:
            woke.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    right.close()
    reader.join(5)
    assert not reader.is_alive() and isinstance(woke[0], (ChannelClosed, OSError))
    left.close()


def test_errors_keep_their_code_across_the_process_boundary() -> None:
    assert isinstance(relayed("insufficient_memory", "no room", 507), InsufficientMemory)
    assert isinstance(relayed("loader_crashed", "died", 500), LoaderCrashed)
    unknown = relayed("something_new", "what", 418)
    assert (unknown.code, unknown.status, unknown.message) == ("something_new", 418, "what")
