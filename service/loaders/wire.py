"""The loader channel: JSON messages (length-prefixed) over a Unix socketpair, with file
descriptors passed by SCM_RIGHTS right after the message that announces them. Nothing is
pickled after the process started; both sides read only JSON."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 64 * 2**20  # a manifest of a very large model stays far below this
MAX_FDS = 250  # SCM_RIGHTS carries at most 253 per message


class ChannelClosed(EOFError):
    """The other side went away (exited, crashed or closed its end)."""


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from a stream socket, or ChannelClosed if it ends first."""
    chunks: list[bytes] = []
    while size:
        try:
            chunk = sock.recv(size)
        except ConnectionResetError as exc:
            raise ChannelClosed(str(exc)) from exc
        if not chunk:
            raise ChannelClosed("the other side closed the channel")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if len(fds) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} file descriptors per message")
        body = json.dumps({**message, "fds": len(fds)}, separators=(",", ":")).encode()
        with self._send_lock:
            try:
                self.sock.sendall(_LENGTH.pack(len(body)) + body)
                if fds:
                    socket.send_fds(self.sock, [b"F"], list(fds))
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosed(str(exc)) from exc

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors it brought (the caller owns them)."""
        (length,) = _LENGTH.unpack(self._exactly(_LENGTH.size))
        if length > MAX_MESSAGE:
            raise ValueError(f"a loader message of {length} bytes is over the limit")
        message: dict[str, Any] = json.loads(self._exactly(length))
        count = int(message.pop("fds", 0))
        if not count:
            return message, []
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 1, count)
        if data != b"F" or len(fds) != count:
            for fd in fds:
                os.close(fd)
            raise ChannelClosed(f"expected {count} file descriptor(s), got {len(fds)}")
        return message, list(fds)

    def _exactly(self, size: int) -> bytes:
        return recv_exactly(self.sock, size)

    def close(self) -> None:
        """Also wakes a thread blocked reading it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
