"""Handing arena fds to workers over a Unix socket (SCM_RIGHTS).

A worker connects to BASEHOLD_SOCKET and sends one JSON line with its lease id and secret;
the service checks them, logs who asked (SO_PEERCRED: pid, uid), and answers one JSON line
carrying a copy of the arena's fd, or an error with a stable code. Nothing else is spoken:
no pickle, no paths. The folder holding the socket must be writable by this user only,
or someone else could put their own socket there.

Workers of another uid (another container, another PID namespace): with
`BASEHOLD_SOCKET_GROUP` the folder is 0750 and the socket 0660 with that group, so members
of the group may connect (they still need a lease's secret); without it, both are private
to this user (0700, 0600).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from service.common.private_dir import FolderUnsafe, check_parent, check_private
from service.common.socket_protocol import MAX_LINE, peer_credentials
from service.serving.socket.throttled_log import ThrottledLog

log = logging.getLogger("basehold.handles")

TIMEOUT_S = 2.0  # a worker sends its one line as soon as it connects
# A connection this young is never closed to make room for another: a worker's request
# follows its connect at once, so only one that sits idle longer can lose its slot.
GRACE_S = 0.25


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection (SO_PEERCRED). `pid` is 0 when the peer
    lives in a PID namespace this process cannot see (another container)."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        where = "another PID namespace" if self.pid == 0 else f"pid {self.pid}"
        return f"{where} uid {self.uid} gid {self.gid}"


# (lease id, secret, peer) -> a new fd the server may close after sending.
# (lease id, secret, peer) -> new fds to send (the arena's, then device segments'); closed after
Authorize = Callable[[str, str, Peer], list[int]]


class SocketUnsafe(FolderUnsafe):
    """The socket's folder could let another user swap the socket; the message says what
    to change."""


def check_folder(folder: Path, group: int | None = None) -> None:
    """Create `folder` (0700) or check that only this user can write it, and that nobody
    else can swap it through its parent. With a `group` (gid), the folder becomes 0750
    with that group: its members may reach the socket."""
    try:
        check_private(folder, "BASEHOLD_SOCKET")
        check_parent(folder, "BASEHOLD_SOCKET")
        if group is not None:
            _give_to_group(folder, group, 0o750)
    except FolderUnsafe as exc:
        raise SocketUnsafe(str(exc)) from None


def _give_to_group(path: Path, group: int, mode: int) -> None:
    try:
        os.chown(path, -1, group)
        os.chmod(path, mode)
    except PermissionError:
        raise SocketUnsafe(
            f"cannot give {path} to group {group} (BASEHOLD_SOCKET_GROUP): this user is not "
            "a member of it. Add the group to the service's supplementary groups (Kubernetes: "
            "securityContext.supplementalGroups) or unset BASEHOLD_SOCKET_GROUP."
        ) from None


def resolve_group(value: str | None) -> int | None:
    """BASEHOLD_SOCKET_GROUP: a group name or a numeric gid (None: no group)."""
    if value is None or value == "":
        return None
    if value.isdigit():
        return int(value)
    import grp

    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise SocketUnsafe(
            f"BASEHOLD_SOCKET_GROUP names no group {value!r} on this machine; give a "
            "numeric gid (containers often have no /etc/group entry for it)."
        ) from None


@dataclass
class _Conn:
    sock: socket.socket
    peer: Peer
    accepted: float
    deadline: float
    data: bytes = b""


class ArenaServer:
    """Listens on `path` and answers arena requests with `authorize`.

    One thread multiplexes every connection (non-blocking, `selectors`): an idle or slow
    client costs an fd, never a thread, and each must send its whole request line within
    `deadline` seconds or is cut off. Connections waiting for their request are capped
    per peer (uid, pid) at `per_peer`, per uid at `per_uid` and in all at
    `max_connections`. A new connection past a cap takes the slot of the oldest waiting
    connection under that cap, if that one has waited `grace` seconds (a worker sends its
    request at once: only an idle or stalled client waits that long); else it is told
    `busy` and closed (workers retry). So idle clients cannot hold slots: a peer the
    server cannot tell apart from others (pid 0: every process of a uid in a sibling
    container) or 40 idle processes turn nobody away for longer than `grace`.
    Complete requests are authorized and answered by a small pool. What clients provoke
    (turned away, cut off, refused) is logged at most once per `log_every` seconds per
    kind, with a count of what was left out. Running out of fds (EMFILE) pauses
    accepting for a moment and never ends the loop; `serving` says whether the loop runs
    (`/readyz` answers 503 when it does not)."""

    def __init__(
        self,
        path: Path,
        authorize: Authorize,
        *,
        group: int | None = None,
        deadline: float = TIMEOUT_S,
        per_peer: int = 16,
        per_uid: int = 64,
        max_connections: int = 512,
        grace: float = GRACE_S,
        log_every: float = 60.0,
    ) -> None:
        self.path = path
        self._authorize = authorize
        self._group = group
        self._deadline = deadline
        self._per_peer = per_peer
        self._per_uid = per_uid
        self._max_connections = max_connections
        self._grace = grace
        self._log = ThrottledLog(log, log_every)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="arena-socket")
        self._answering = 0  # requests submitted to the pool and not answered yet
        self._answering_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._conns: dict[int, _Conn] = {}
        self._selector: selectors.BaseSelector | None = None
        self._paused_until = 0.0
        self.accept_errors = 0
        self.refused = 0  # new connections told `busy`
        self.evicted = 0  # waiting connections closed to make room for a new one

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, listener: socket.socket | None = None) -> None:
        """Bind `path` and serve; or serve `listener`, bound there by a predecessor that
        handed it over (the path and its mode stay as they are)."""
        if listener is None:
            listener = self._bind()
        listener.setblocking(False)
        self._listener = listener
        # Made here, not in the thread: the loop itself never needs a new fd.
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._serve, name="arena-socket", daemon=True)
        self._thread.start()
        log.info("handing arenas to workers on %s", self.path)

    def dup_listener(self) -> int:
        """A new fd of the listening socket, for a successor (the caller closes it)."""
        if self._listener is None:
            raise RuntimeError("the worker socket is not serving")
        return os.dup(self._listener.fileno())

    def _bind(self) -> socket.socket:
        check_folder(self.path.parent, self._group)
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
        if self._group is None:
            os.chmod(self.path, 0o600)
        else:
            _give_to_group(self.path, self._group, 0o660)
        listener.listen(128)
        return listener

    def stop(self, *, unlink: bool = True) -> None:
        """Stop at once: the loop is woken, not polled. `unlink=False`: the path stays (a
        successor serves the same socket now)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            if unlink:
                self.path.unlink(missing_ok=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop ------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._listener is not None and self._selector is not None
        selector = self._selector
        selector.register(self._wake_r, selectors.EVENT_READ)
        listening = False
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if not listening and now >= self._paused_until:
                    selector.register(self._listener, selectors.EVENT_READ)
                    listening = True
                for key, _ in selector.select(self._timeout(now)):
                    if key.fileobj is self._listener:
                        if not self._accept(selector):
                            selector.unregister(self._listener)
                            listening = False
                    elif key.fileobj is not self._wake_r:
                        self._receive(selector, self._conns[key.fd])
                self._cut_off_late(selector)
                self._log.flush_due()
        except Exception:
            log.exception("arena socket: the serving loop failed; workers cannot attach")
        finally:
            for conn in list(self._conns.values()):
                self._close(selector, conn)
            selector.close()

    def _timeout(self, now: float) -> float:
        soonest = min((c.deadline for c in self._conns.values()), default=now + 1.0)
        if self._paused_until > now:
            soonest = min(soonest, self._paused_until)
        return max(0.0, min(soonest - now, 1.0))

    def _accept(self, selector: selectors.BaseSelector) -> bool:
        """Accept what is pending; False when out of fds (accepting pauses briefly)."""
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                self.accept_errors += 1
                self._paused_until = time.monotonic() + 0.1
                if self.accept_errors == 1 or self.accept_errors % 100 == 0:
                    log.warning(
                        "arena socket: cannot accept (%s; %d time(s)); pausing briefly",
                        exc.strerror,
                        self.accept_errors,
                    )
                return False
            self._admit(selector, sock)

    def _admit(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        peer = Peer(*peer_credentials(sock))
        sock.setblocking(False)
        now = time.monotonic()
        # Per (uid, pid): pid 0 is every peer of that uid in another PID namespace.
        caps: list[tuple[Callable[[Peer], bool], int]] = [
            (lambda p: (p.uid, p.pid) == (peer.uid, peer.pid), self._per_peer),
            (lambda p: p.uid == peer.uid, self._per_uid),
            (lambda p: True, self._max_connections),
        ]
        for under, cap in caps:
            waiting = [c for c in self._conns.values() if under(c.peer)]  # oldest first
            # The total counts requests waiting for, or in, the answering pool too: what
            # a slow authorization holds up is bounded like what slow clients hold up.
            answering = self._answering if cap is self._max_connections else 0
            if len(waiting) + answering < cap:
                continue
            oldest = waiting[0] if waiting else None
            if oldest is None or now - oldest.accepted < self._grace:
                self.refused += 1
                self._log.warning(
                    "turned away", "arena socket: too many connections; turned away %s", peer
                )
                detail = "too many open connections from you or in all; retry shortly"
                self._send(sock, {"ok": False, "code": "busy", "detail": detail})
                sock.close()
                return
            self.evicted += 1
            self._log.warning(
                "closed to make room",
                "arena socket: %s sent no complete request in %.1f s; closed to make room for %s",
                oldest.peer,
                now - oldest.accepted,
                peer,
            )
            detail = "closed to make room: send your request as soon as you connect, and retry"
            self._send(oldest.sock, {"ok": False, "code": "busy", "detail": detail})
            self._close(selector, oldest)
        conn = _Conn(sock, peer, now, now + self._deadline)
        self._conns[sock.fileno()] = conn
        selector.register(sock, selectors.EVENT_READ)

    def _receive(self, selector: selectors.BaseSelector, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(MAX_LINE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        conn.data += chunk
        if b"\n" not in conn.data and chunk and len(conn.data) <= MAX_LINE:
            return  # more to come
        selector.unregister(conn.sock)
        del self._conns[conn.sock.fileno()]
        with self._answering_lock:
            self._answering += 1
        future = self._pool.submit(self._answer, conn)
        future.add_done_callback(self._answered)

    def _answered(self, future: Future[None]) -> None:
        with self._answering_lock:
            self._answering -= 1
        _log_failure(future)

    def _cut_off_late(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._log.warning(
                "cut off",
                "arena socket: %s sent no complete request in %.0f s; closed",
                conn.peer,
                self._deadline,
            )
            detail = f"send one JSON line with lease_id and secret within {self._deadline:.0f} s"
            self._send(conn.sock, {"ok": False, "code": "timeout", "detail": detail})
            self._close(selector, conn)

    def _close(self, selector: selectors.BaseSelector, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(conn.sock)
        conn.sock.close()

    # -- one request (pool thread) -------------------------------------------------------
    def _answer(self, conn: _Conn) -> None:
        with conn.sock:
            line = conn.data.split(b"\n", 1)[0] if b"\n" in conn.data else b""
            try:
                request = json.loads(line)
                lease_id, secret = str(request["lease_id"]), str(request["secret"])
            except (ValueError, KeyError, TypeError):
                self._log.warning("malformed", "arena socket: malformed request from %s", conn.peer)
                detail = "send one JSON line with lease_id and secret"
                self._send(conn.sock, {"ok": False, "code": "bad_request", "detail": detail})
                return
            try:
                fds = self._authorize(lease_id, secret, conn.peer)
            except Exception as exc:
                code = str(getattr(exc, "code", "internal"))
                detail = str(getattr(exc, "message", exc))
                self._log.warning(
                    f"refused {code[:32]}",
                    "arena socket: refused %s for %s: %s",
                    lease_id[:64],
                    conn.peer,
                    code,
                )
                self._send(conn.sock, {"ok": False, "code": code, "detail": detail})
                return
            try:
                self._send(conn.sock, {"ok": True, "fds": len(fds)}, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    @staticmethod
    def _send(sock: socket.socket, body: dict[str, object], fds: Sequence[int] = ()) -> None:
        """One short line (and the fds) into an empty socket buffer: never blocks."""
        message = (json.dumps(body) + "\n").encode()
        try:
            if not fds:
                sock.send(message)
            else:
                socket.send_fds(sock, [message], list(fds))
        except OSError as exc:
            log.warning("arena socket: could not answer: %s", exc)


def _log_failure(future: Future[None]) -> None:
    exc = future.exception() if not future.cancelled() else None
    if exc is not None:
        log.error("arena socket: answering a request failed", exc_info=exc)
