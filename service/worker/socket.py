"""The worker's end of the service's socket: present a lease id and its secret, get the
model's file descriptors (the arena's, then one per device segment)."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import random
import socket
import stat
import time

from service.common.socket_protocol import MAX_FDS, MAX_LINE, ArenaRefused, peer_credentials

# `busy` answers are retried with exponential backoff (and jitter) within the deadline.
BUSY_FIRST_S = 0.05
BUSY_MAX_S = 1.0


def receive_arena(
    path: str, lease_id: str, secret: str, socket_uid: int | None, timeout: float = 30.0
) -> int:
    """`receive_fds`, keeping only the arena's fd (for models without device segments)."""
    arena, *segments = receive_fds(path, lease_id, secret, socket_uid, timeout)
    for fd in segments:
        os.close(fd)
    return arena


def receive_fds(
    path: str, lease_id: str, secret: str, socket_uid: int | None, timeout: float = 30.0
) -> list[int]:
    """Worker side: ask the service at `path` for the fds of `lease_id`'s model: the
    arena's, then one per device segment. The peer must run as `socket_uid` (the handle
    says which uid serves the socket): a socket someone else swapped in gets no secret.
    A `busy` service (too many connections waiting, or a full accept queue) is asked again
    with exponential backoff and jitter until `timeout` seconds have passed in all."""
    deadline = time.monotonic() + timeout
    pause = BUSY_FIRST_S
    while True:
        try:
            return _ask(path, lease_id, secret, socket_uid, max(deadline - time.monotonic(), 0.1))
        except ArenaRefused as exc:
            left = deadline - time.monotonic()
            if exc.code != "busy" or left <= 0:
                raise
        # Half the pause fixed, half random: workers turned away together spread out.
        time.sleep(min(pause / 2 + random.uniform(0, pause / 2), left))
        pause = min(pause * 2, BUSY_MAX_S)


def not_in_group(path: str, exc: OSError) -> str:
    """Worker side, EACCES on the socket: the worker sees the path but is not in the group
    the service lets connect (BASEHOLD_SOCKET_GROUP). Names the group to join."""
    where = f"cannot open the service's socket {path} ({exc.strerror}) as uid {os.getuid()}"
    try:
        folder = os.stat(os.path.dirname(path) or ".")
    except OSError:
        return f"{where}: run the worker in the group the service's BASEHOLD_SOCKET_GROUP names."
    if not folder.st_mode & stat.S_IXGRP:
        return (
            f"{where}: its folder is the service user's alone. Set BASEHOLD_SOCKET_GROUP on the "
            "service and run the worker as a member of that group."
        )
    gid = folder.st_gid
    try:
        name = f"{grp.getgrgid(gid).gr_name!r} (gid {gid})"
    except KeyError:  # a gid this container's /etc/group does not list
        name = f"gid {gid}"
    return (
        f"{where}: join the socket's group {name} (Kubernetes: securityContext."
        f"supplementalGroups: [{gid}]; docker run --group-add {gid})."
    )


def _ask(
    path: str, lease_id: str, secret: str, socket_uid: int | None, timeout: float
) -> list[int]:
    """One request: the fds, or ArenaRefused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
        except BlockingIOError:  # EAGAIN: the accept queue is full
            raise ArenaRefused(
                "busy", f"the service's socket {path} accepts no more connections for now"
            ) from None
        except PermissionError as exc:
            raise ArenaRefused("socket_unreachable", not_in_group(path, exc)) from exc
        except OSError as exc:
            raise ArenaRefused(
                "socket_unreachable",
                f"cannot reach the service's socket {path} ({exc.strerror}). Run the worker "
                "where it can see that path (share the folder with the service's container).",
            ) from exc
        _, uid, _ = peer_credentials(conn)
        if socket_uid is not None and uid != socket_uid:
            raise ArenaRefused(
                "socket_impostor",
                f"{path} is served by uid {uid}, but the service runs as uid {socket_uid}: "
                "someone else's socket is in its place, so the lease's secret was not sent. "
                "Tell the operator; check who can write the socket's folder and its parent.",
            )
        # Turned away at once (busy), the send may fail: the answer is still there to read.
        with contextlib.suppress(OSError):
            conn.sendall((json.dumps({"lease_id": lease_id, "secret": secret}) + "\n").encode())
        try:
            message, fds, _, _ = socket.recv_fds(conn, MAX_LINE, MAX_FDS)
        except OSError as exc:
            raise ArenaRefused(
                "socket_unreachable",
                f"the service's socket {path} closed the connection ({exc}); retry.",
            ) from exc
    try:
        answer = json.loads(message.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        answer = {}
    if answer.get("ok") and fds and len(fds) == answer.get("fds", 1):
        return list(fds)
    for fd in fds:
        os.close(fd)
    raise ArenaRefused(
        str(answer.get("code", "bad_answer")),
        str(answer.get("detail", "the service's socket gave no arena")),
    )
