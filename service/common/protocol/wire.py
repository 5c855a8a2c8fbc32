"""Frames of the loader protocol: length-prefixed JSON over a Unix stream socket, with file
descriptors passed by SCM_RIGHTS on one byte right after the frame that announces them.
Nothing is pickled; both sides read only JSON, typed by `service.common.protocol.messages`.

Reads take a deadline (`ChannelTimeout` past it) and check what they get: a frame that is
not a JSON object, a message that does not validate, or fds that are not the announced
count raise `BadMessage` once every fd that came with it is closed. `FrameReader` reads
one frame at a time with exact-size reads, so the template can read many requesters
without blocking (`service.loader.forker`) and the serving process can read a loader with
a deadline (`Channel`)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # typed messages come from pydantic; frames (the keeper's) need nothing
    from pydantic import BaseModel, TypeAdapter, ValidationError

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 64 * 2**20  # a manifest of a very large model stays far below this
MAX_FDS = 250  # SCM_RIGHTS carries at most 253 per message
# A Channel message may bring more, in frames of MAX_FDS that follow it ({"type": "fds"}):
# a handover of many models, each with its device segments.
MAX_TOTAL_FDS = 8192
_MORE = "more_fds"
_FDS_MARK = b"F"

T = TypeVar("T")


class ChannelClosed(EOFError):
    """The other side went away (exited, crashed or closed its end)."""


class ChannelTimeout(TimeoutError):
    """Nothing, or not a whole message, came before the deadline."""


class BadMessage(ValueError):
    """The other side sent something that is not a message of this protocol (its fds are
    closed by the time this is raised)."""


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def describe(exc: ValidationError) -> str:
    """Where and why a message did not validate, never its values (a job holds a token)."""
    parts = [
        f"{'.'.join(str(p) for p in error['loc']) or 'message'}: {error['msg']}"
        for error in exc.errors(include_input=False, include_url=False)[:5]
    ]
    return "; ".join(parts)


def parse(adapter: TypeAdapter[T], data: dict[str, Any], fds: list[int]) -> T:
    """`data` as the message type `adapter` names, or BadMessage with `fds` closed."""
    from pydantic import ValidationError

    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        close_fds(fds)
        raise BadMessage(describe(exc)) from None


def encode(message: BaseModel | dict[str, Any], count: int) -> bytes:
    """One frame: the length, then the JSON object with the number of fds that follow."""
    data = message if isinstance(message, dict) else message.model_dump(mode="json")
    body = json.dumps({**data, "fds": count}, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"a loader message of {len(body)} bytes is over the limit")
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """One frame at a time, each `step` one read of exactly what the frame still lacks
    (never past its end). On a blocking socket call `step` until it returns the message;
    on a non-blocking one, whenever the socket is readable (BlockingIOError: not yet)."""

    def __init__(self, max_fds: int = MAX_FDS) -> None:
        self.max_fds = max_fds
        self._buffer = bytearray()
        self._length: int | None = None
        self._message: dict[str, Any] | None = None
        self._count = 0

    def step(self, sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
        """The message and its fds once complete (the caller owns the fds), else None."""
        if self._message is not None:
            return self._fds(sock)
        want = _LENGTH.size if self._length is None else self._length
        chunk = self._recv(sock, want - len(self._buffer))
        self._buffer += chunk
        if len(self._buffer) < want:
            return None
        if self._length is None:
            (self._length,) = _LENGTH.unpack(self._buffer)
            self._buffer.clear()
            if self._length > MAX_MESSAGE:
                raise BadMessage(f"a frame of {self._length} bytes is over the limit")
            return None
        message = self._decode(bytes(self._buffer))
        self._buffer.clear()
        self._length = None
        if not self._count:
            return message, []
        self._message = message
        return None

    def _decode(self, body: bytes) -> dict[str, Any]:
        try:
            message = json.loads(body)
        except ValueError as exc:
            raise BadMessage(f"a frame that is not JSON ({exc})") from None
        if not isinstance(message, dict):
            raise BadMessage("a frame that is not a JSON object")
        count = message.pop("fds", 0)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= self.max_fds:
            raise BadMessage(f"a frame announcing {count!r} fds (at most {self.max_fds})")
        self._count = count
        return message

    def _fds(self, sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
        try:
            data, fds, flags, _ = socket.recv_fds(sock, 1, self._count)
        except ConnectionResetError as exc:
            raise ChannelClosed(str(exc)) from exc
        message, count = self._message, self._count
        self._message, self._count = None, 0
        assert message is not None
        if not data and not fds:
            raise ChannelClosed("the other side closed the channel")
        if data != _FDS_MARK or len(fds) != count or flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise BadMessage(f"{count} fd(s) announced, {len(fds)} came")
        return message, list(fds)

    @staticmethod
    def _recv(sock: socket.socket, size: int) -> bytes:
        try:
            chunk = sock.recv(size)
        except ConnectionResetError as exc:
            raise ChannelClosed(str(exc)) from exc
        if not chunk:
            raise ChannelClosed("the other side closed the channel")
        return chunk


def _readable(sock: socket.socket, timeout: float | None) -> bool:
    fd = sock.fileno()
    if fd < 0:
        raise ChannelClosed("the channel was closed")
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)))


class Channel:
    """One side of a connection: typed messages out, frames in, each read with a deadline.
    Reads are for one thread at a time; sends may come from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = FrameReader()
        self._send_lock = threading.Lock()

    def send(self, message: BaseModel | dict[str, Any], fds: Sequence[int] = ()) -> None:
        """A typed message (a dict only where a test writes a frame by hand); more than
        MAX_FDS fds go in frames of their own right after it."""
        if len(fds) > MAX_TOTAL_FDS:
            raise ValueError(f"at most {MAX_TOTAL_FDS} file descriptors per message")
        data = message if isinstance(message, dict) else message.model_dump(mode="json")
        chunks = [list(fds[i : i + MAX_FDS]) for i in range(0, len(fds), MAX_FDS)] or [[]]
        if len(chunks) > 1:
            data = {**data, _MORE: len(fds) - len(chunks[0])}
        frames = [(encode(data, len(chunks[0])), chunks[0])]
        frames += [(encode({"type": "fds"}, len(chunk)), chunk) for chunk in chunks[1:]]
        with self._send_lock:
            try:
                for frame, chunk in frames:
                    self.sock.sendall(frame)
                    if chunk:
                        socket.send_fds(self.sock, [_FDS_MARK], chunk)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosed(str(exc)) from exc

    def recv(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """The next message and the fds it brought (the caller owns them), with those of
        the frames that follow it. ChannelTimeout when it is not all there within
        `timeout` seconds (None: no deadline)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        message, fds = self._frame(deadline, timeout)
        more = message.pop(_MORE, 0)
        if not isinstance(more, int) or isinstance(more, bool) or not 0 <= more <= MAX_TOTAL_FDS:
            close_fds(fds)
            raise BadMessage(f"a frame announcing {more!r} more fds")
        try:
            while more > 0:
                extra, chunk = self._frame(deadline, timeout)
                fds += chunk
                more -= len(chunk)
                if extra != {"type": "fds"} or not chunk or more < 0:
                    raise BadMessage("the fds announced did not follow their message")
        except BaseException:
            close_fds(fds)
            raise
        return message, fds

    def _frame(
        self, deadline: float | None, timeout: float | None
    ) -> tuple[dict[str, Any], list[int]]:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and (left <= 0 or not _readable(self.sock, left)):
                raise ChannelTimeout(f"no message within {timeout:g} s")
            try:
                got = self._reader.step(self.sock)
            except OSError as exc:  # closed under us (another thread's close)
                raise ChannelClosed(str(exc)) from exc
            if got is not None:
                return got

    def receive(self, adapter: TypeAdapter[T], timeout: float | None = None) -> tuple[T, list[int]]:
        """The next message, validated as `adapter`'s type (BadMessage, its fds closed,
        if it is not one)."""
        data, fds = self.recv(timeout)
        return parse(adapter, data, fds), fds

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Whether something (a message, or the end) arrived within `timeout`."""
        try:
            return _readable(self.sock, timeout)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc

    def wait_closed(self) -> None:
        """Until the other side closes (what it sends meanwhile is dropped), or this side
        is closed from another thread."""
        while True:
            try:
                self.wait_readable()
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, MAX_FDS)
            except (ChannelClosed, OSError):
                return
            close_fds(fds)
            if not data:
                return

    def close(self) -> None:
        """Also wakes a thread blocked reading it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
