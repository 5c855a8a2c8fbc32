"""Handing arena fds to workers over a Unix socket (SCM_RIGHTS).

A worker connects to BASEHOLD_SOCKET and sends one JSON line with its lease id and secret;
the service checks them, logs who asked (SO_PEERCRED: pid, uid), and answers one JSON line
carrying a copy of the arena's fd, or an error with a stable code. Nothing else is spoken:
no pickle, no paths. The folder holding the socket must be writable by this user only,
or someone else could put their own socket there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.private_dir import FolderUnsafe, check_parent, check_private

log = logging.getLogger("basehold.handles")

MAX_LINE = 4096
TIMEOUT_S = 5.0

# (lease id, secret, peer description) -> a new fd the server may close after sending.
Authorize = Callable[[str, str, str], int]


class SocketUnsafe(FolderUnsafe):
    """The socket's folder could let another user swap the socket; the message says what
    to change."""


class ArenaRefused(RuntimeError):
    """The service refused to hand out an arena (wrong secret, lease gone, ...)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def check_folder(folder: Path) -> None:
    """Create `folder` (0700) or check that only this user can write it, and that nobody
    else can swap it through its parent."""
    try:
        check_private(folder, "BASEHOLD_SOCKET")
        check_parent(folder, "BASEHOLD_SOCKET")
    except FolderUnsafe as exc:
        raise SocketUnsafe(str(exc)) from None


def _peer(conn: socket.socket) -> tuple[int, int, int]:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_LINE)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


class ArenaServer:
    """Listens on `path` and answers arena requests with `authorize`."""

    def __init__(self, path: Path, authorize: Authorize) -> None:
        self.path = path
        self._authorize = authorize
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="arena-socket")
        self._stopping = threading.Event()

    def start(self) -> None:
        check_folder(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # left by a process that died
            else:
                raise SocketUnsafe(
                    f"another process is serving {self.path}; give this service its own "
                    "BASEHOLD_SOCKET"
                )
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(64)
        listener.settimeout(0.5)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="arena-socket", daemon=True)
        self._thread.start()
        log.info("handing arenas to workers on %s", self.path)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self.path.unlink(missing_ok=True)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _serve(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._pool.submit(self._answer, conn)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT_S)
            pid, uid, _ = _peer(conn)
            who = f"pid {pid} uid {uid}"
            try:
                request = json.loads(_read_line(conn))
                lease_id, secret = str(request["lease_id"]), str(request["secret"])
            except (ValueError, KeyError, TypeError, OSError):
                log.warning("arena socket: malformed request from %s", who)
                self._send(
                    conn,
                    {
                        "ok": False,
                        "code": "bad_request",
                        "detail": "send one JSON line with lease_id and secret",
                    },
                )
                return
            try:
                fd = self._authorize(lease_id, secret, who)
            except Exception as exc:
                code = str(getattr(exc, "code", "internal"))
                detail = str(getattr(exc, "message", exc))
                log.warning("arena socket: refused %s for %s: %s", lease_id[:64], who, code)
                self._send(conn, {"ok": False, "code": code, "detail": detail})
                return
            try:
                self._send(conn, {"ok": True}, fd)
            finally:
                os.close(fd)

    @staticmethod
    def _send(conn: socket.socket, body: dict[str, object], fd: int | None = None) -> None:
        message = (json.dumps(body) + "\n").encode()
        try:
            if fd is None:
                conn.sendall(message)
            else:
                socket.send_fds(conn, [message], [fd])
        except OSError as exc:
            log.warning("arena socket: could not answer: %s", exc)


def receive_arena(path: str, lease_id: str, secret: str, timeout: float = 30.0) -> int:
    """Worker side: ask the service at `path` for the arena of `lease_id`; returns the fd."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
        except OSError as exc:
            raise ArenaRefused(
                "socket_unreachable",
                f"cannot reach the service's socket {path} ({exc.strerror}). Run the worker "
                "where it can see that path (share the folder with the service's container).",
            ) from exc
        conn.sendall((json.dumps({"lease_id": lease_id, "secret": secret}) + "\n").encode())
        message, fds, _, _ = socket.recv_fds(conn, MAX_LINE, 1)
    try:
        answer = json.loads(message.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        answer = {}
    if answer.get("ok") and len(fds) == 1:
        return fds[0]
    for fd in fds:
        os.close(fd)
    raise ArenaRefused(
        str(answer.get("code", "bad_answer")),
        str(answer.get("detail", "the service's socket gave no arena")),
    )
