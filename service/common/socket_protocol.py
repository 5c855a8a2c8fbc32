"""The worker socket's protocol, as both ends speak it: a worker sends one JSON line (lease
id and secret), the service answers one JSON line with the model's fds (SCM_RIGHTS) or a
refusal with a stable code. Each end checks who is on the other (SO_PEERCRED)."""

from __future__ import annotations

import socket
import struct

MAX_LINE = 4096
MAX_FDS = 64  # the arena and the segments (at most 48: service.loader.segment_chunks)


class ArenaRefused(RuntimeError):
    """The service refused to hand out an arena (wrong secret, lease gone, ...)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid
