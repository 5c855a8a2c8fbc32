"""The loader channel: typed JSON messages with fds, read with a deadline; what the reader
sees when the other side goes away or sends something that is not a message."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from service.common.errors import InsufficientMemory, LoaderCrashed, relayed
from service.common.load.sources import HubOptions
from service.common.load.spec import LoadRequest
from service.common.protocol.job import Job, StandIn
from service.common.protocol.messages import FROM_LOADER, TO_TEMPLATE, Spawn
from service.common.protocol.wire import (
    BadMessage,
    Channel,
    ChannelClosed,
    ChannelTimeout,
    encode,
    parse,
)
from tests.common.handles.host_segments import HostSegments


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


def test_more_fds_than_one_frame_carries_arrive_with_their_message() -> None:
    """A handover of many models: 300 fds, in the message's frame and one that follows."""
    left, right = (Channel(s) for s in socket.socketpair())
    sent = [os.memfd_create(f"arena-{i}") for i in range(300)]
    try:
        writer = threading.Thread(target=left.send, args=({"type": "offer"}, sent))
        writer.start()
        message, fds = right.recv(30)
        writer.join(30)
        assert message == {"type": "offer"} and len(fds) == 300
        assert [os.fstat(fd).st_ino for fd in fds] == [os.fstat(fd).st_ino for fd in sent]
        for fd in fds:
            os.close(fd)
        left.send({"type": "after"})
        assert right.recv(30) == ({"type": "after"}, [])
    finally:
        for fd in sent:
            os.close(fd)
        left.close()
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


def test_a_read_past_its_deadline_raises_channel_timeout() -> None:
    left, right = (Channel(s) for s in socket.socketpair())
    with pytest.raises(ChannelTimeout):
        right.recv(timeout=0.1)  # nothing at all
    left.sock.sendall(b"\0\0\0\x10{")  # a frame's start, never its end
    with pytest.raises(ChannelTimeout):
        right.recv(timeout=0.1)
    left.close()
    right.close()


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "ready", "facts": {"nothing": "here"}},  # wrong fields
        {"type": "surprise"},  # a type the protocol does not have
        {"type": "progress", "phase": "loading", "bytes_done": -1, "bytes_total": 0},
    ],
)
def test_a_message_that_does_not_validate_closes_its_fds(frame: dict[str, object]) -> None:
    left, right = (Channel(s) for s in socket.socketpair())
    fd = os.memfd_create("arena")
    left.send(frame, [fd])
    os.close(fd)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(BadMessage):
        right.receive(FROM_LOADER, timeout=5)
    assert set(os.listdir("/proc/self/fd")) <= before  # the fd that came is closed again
    left.close()
    right.close()


def test_fds_other_than_announced_are_all_closed() -> None:
    left, right = (Channel(s) for s in socket.socketpair())
    fd = os.memfd_create("arena")
    left.sock.sendall(encode({"type": "ready"}, 2))  # two announced, one comes
    socket.send_fds(left.sock, [b"F"], [fd])
    os.close(fd)
    opened = set(os.listdir("/proc/self/fd"))
    with pytest.raises(BadMessage, match="2 fd"):
        right.recv(timeout=5)
    assert set(os.listdir("/proc/self/fd")) <= opened
    left.close()
    right.close()


def test_a_job_travels_as_typed_json_and_never_shows_its_token() -> None:
    job = Job(
        model_id="m",
        load_id="l",
        spec=LoadRequest(source="/models/llama"),
        token="hf_s3cret",
        roots=[Path("/models")],
        offload_root=Path("/state/offload"),
        hub=HubOptions(endpoint="http://127.0.0.1:1", retries=1),
        socket="/run/basehold/basehold.sock",
        segments=StandIn.of(HostSegments()),
        hub_env={"HF_TOKEN": "hf_server"},
    )
    frame = json.loads(encode(Spawn(kind="load", job=job), 2)[4:])
    assert frame["fds"] == 2 and frame["job"]["token"] == "hf_s3cret"
    spawn = TO_TEMPLATE.validate_python({k: v for k, v in frame.items() if k != "fds"})
    assert isinstance(spawn, Spawn) and spawn.job == job
    assert isinstance(spawn.job.segments, StandIn)
    assert isinstance(spawn.job.segments.build(), HostSegments)
    assert "hf_s3cret" not in repr(job) and "hf_server" not in repr(job)
    with pytest.raises(BadMessage) as bad:  # what a refusal logs names no value
        parse(TO_TEMPLATE, {**frame, "kind": "unpickle", "fds": None}, [])
    assert "hf_s3cret" not in str(bad.value)
