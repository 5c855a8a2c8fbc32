"""Loaders that misbehave, for the protocol tests.

A template the tests start with `BASEHOLD_LOADER_PRELOAD=tests.serving.loaders.rogue` imports this
module before it forks: a job whose model id names a behaviour below runs that behaviour
in the loader process instead of a load; every other job loads as usual. The behaviours
write the channel's frames by hand (a length, the JSON, then one byte carrying the fds),
as a loader of other code could.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from service.loader import child

SOCKET_CLAIMED = "/tmp/bh-rogue-elsewhere.sock"
UID_CLAIMED = 4242


def _frame(
    sock: socket.socket, message: dict[str, Any], fds: Sequence[int], announced: int
) -> None:
    body = json.dumps({**message, "fds": announced}).encode()
    sock.sendall(struct.pack("!I", len(body)) + body)
    if fds:
        socket.send_fds(sock, [b"F"], list(fds))


def _arena() -> int:
    fd = os.memfd_create("bh-rogue-arena")
    os.write(fd, b"\0" * 64)
    return fd


def manifest(
    socket_path: str, uid: int, checkpoint: str = "/rogue", allowed: str = "/rogue"
) -> dict[str, Any]:
    """A well-formed manifest of a shareable model with an empty arena, whose handle names
    `socket_path` and `uid` as where workers fetch it, and whose small files are served
    from `checkpoint`, confined to `allowed`."""
    handle = {
        "model_id": "liar",
        "arena": {"socket": socket_path, "name": "bh-rogue-arena", "size": 64, "data_start": 0},
        "socket_uid": uid,
        "entries": [],
        "parameters": {},
        "buffers": {},
        "config": {},
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "provenance": {"source": "/rogue"},
        "torch_version": "0",
    }
    return {
        "task": "causal-lm",
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "parameters": 0,
        "resolved_revision": None,
        "by_device": {"cpu": 64},
        "device_map": {"": "cpu"},
        "shareable": True,
        "reason": None,
        "handle": handle,
        "checkpoint": checkpoint,
        "allowed": [allowed],
    }


def _linger(sock: socket.socket) -> None:
    """Stay until the service closes the channel (or has this process killed)."""
    while sock.recv(4096):
        pass


def liar(sock: socket.socket, job: Any) -> None:
    """A well-formed manifest that names another socket and another uid, and claims the
    whole disk as where its checkpoint's files may be served from."""
    fd = _arena()
    facts = manifest(SOCKET_CLAIMED, UID_CLAIMED, job.spec.source, "/")
    _frame(sock, {"type": "ready", "facts": facts}, [fd], 1)
    os.close(fd)
    _linger(sock)


def outside(sock: socket.socket, job: Any) -> None:
    """A manifest whose checkpoint folder (whose files the service would serve) is a folder
    outside the model roots and the hub cache."""
    fd = _arena()
    facts = manifest(SOCKET_CLAIMED, os.getuid(), "/etc", "/")
    _frame(sock, {"type": "ready", "facts": facts}, [fd], 1)
    os.close(fd)
    _linger(sock)


def wrong_fields(sock: socket.socket, job: Any) -> None:
    """A `ready` whose facts are not a manifest, with the arena's fd."""
    fd = _arena()
    _frame(sock, {"type": "ready", "facts": {"shape": "of nothing"}}, [fd], 1)
    os.close(fd)


def wrong_type(sock: socket.socket, job: Any) -> None:
    """A message type the protocol does not have, with an fd."""
    fd = _arena()
    _frame(sock, {"type": "surprise", "what": 1}, [fd], 1)
    os.close(fd)


def wrong_fd_count(sock: socket.socket, job: Any) -> None:
    """A manifest that announces two fds and brings one."""
    fd = _arena()
    _frame(sock, {"type": "ready", "facts": manifest(SOCKET_CLAIMED, os.getuid())}, [fd], 2)
    os.close(fd)


def linger(sock: socket.socket, job: Any) -> None:
    """Say nothing; stay until told."""
    _linger(sock)


BEHAVIOURS: dict[str, Callable[[socket.socket, Any], None]] = {
    "rogue-liar": liar,
    "rogue-outside": outside,
    "rogue-wrong-fields": wrong_fields,
    "rogue-wrong-type": wrong_type,
    "rogue-wrong-fd-count": wrong_fd_count,
    "rogue-linger": linger,
}
_load = child.main


def _main(kind: Any, sock: socket.socket, job: Any) -> None:
    behaviour = BEHAVIOURS.get(job.model_id)
    if behaviour is None:
        _load(kind, sock, job)
        return
    try:
        behaviour(sock, job)
    finally:
        sock.close()


child.main = _main
