"""The loader template process: `python -m service.loaders.forker --listen PATH`.

It imports torch, transformers, accelerate, bitsandbytes and common model code once, then
forks one child per request on its Unix socket (the same uid only). A request is one
connection: the job (pickled by the serving process of the same user) with the child's
channel fd; the answer is the child's pid, then, when it ends, its exit status (negative:
the signal). If the requester hangs up first, the child is killed: a loader never outlives
the service that asked for it. The template exits when its owner closes its stdin, or on
SIGTERM. It stays single-threaded, so forking it is safe.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import logging
import os
import pickle
import selectors
import signal
import socket
import sys
from typing import Any

from service.handles.fdpass import peer_credentials
from service.loaders.template import HEADER, STATUS, preload
from service.loaders.wire import ChannelClosed, recv_exactly

log = logging.getLogger("basehold.template")

_PR_SET_PDEATHSIG = 1
MAX_JOB = 16 * 2**20


def _preload(modules: list[str]) -> list[str]:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _read_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The pickled job and the two fds that came with its header: the channel, and the
    requester's stderr (the loader logs where its service logs)."""
    conn.settimeout(30)
    header, fds, _flags, _addr = socket.recv_fds(conn, HEADER.size, 2)
    if len(header) != HEADER.size or len(fds) != 2:
        _close(fds)
        raise ValueError("a request starts with its length and two fds")
    (length,) = HEADER.unpack(header)
    try:
        if length > MAX_JOB:
            raise ValueError("the job is too large")
        body = recv_exactly(conn, length)
    except (ValueError, ChannelClosed) as exc:
        _close(fds)
        raise ValueError(f"the job was cut short or too large: {exc}") from exc
    conn.settimeout(None)
    return body, fds


def _child(body: bytes, fds: list[int], closing: list[int]) -> None:
    """In the forked child: become the loader (never returns)."""
    code = 1
    channel_fd, stderr_fd = fds
    try:
        _close(closing)
        os.dup2(stderr_fd, 1)
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the template went: so do we
        kind, job = pickle.loads(body)
        from service.loaders import entry

        entry.run(kind, socket.socket(fileno=channel_fd), job)
        code = 0
    except BaseException:
        log.exception("loader child failed before it could report")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Forker:
    def __init__(self, listener: socket.socket, owner: int | None) -> None:
        self.listener = listener
        self.owner = owner  # the owner's stdin: EOF means the owner is gone
        self.children: dict[int, socket.socket] = {}  # pid -> its requester's connection
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        self.stopping = False

    def serve(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "signal")
        if self.owner is not None:
            self.selector.register(self.owner, selectors.EVENT_READ, "owner")
        while not self.stopping:
            for key, _ in self.selector.select():
                if key.data == "accept":
                    self._accept()
                elif key.data == "signal":
                    self._signals()
                elif key.data == "owner":
                    if not os.read(self.owner or 0, 4096):
                        self.stopping = True
                else:
                    self._hung_up(key.data, key.fileobj)
        for pid in list(self.children):
            self._kill(pid)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        _, uid, _ = peer_credentials(conn)
        if uid != os.getuid():
            conn.close()
            return
        try:
            body, fds = _read_request(conn)
        except (OSError, ValueError) as exc:
            log.warning("template: bad request: %s", exc)
            conn.close()
            return
        closing = [self.listener.fileno(), self.wake_r, self.wake_w, conn.fileno()]
        closing += [c.fileno() for c in self.children.values()]
        if self.owner is not None:
            closing.append(self.owner)
        pid = os.fork()
        if pid == 0:
            _child(body, fds, closing)
        _close(fds)
        self.children[pid] = conn
        try:
            conn.sendall(STATUS.pack(pid))
        except OSError:
            self._kill(pid)
            return
        self.selector.register(conn, selectors.EVENT_READ, pid)

    def _signals(self) -> None:
        while True:
            try:
                data = os.read(self.wake_r, 4096)
            except BlockingIOError:
                break
            if signal.SIGTERM in data:
                self.stopping = True
            if len(data) < 4096:
                break
        self._reap()

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn)
            with contextlib.suppress(OSError):
                conn.sendall(STATUS.pack(os.waitstatus_to_exitcode(status)))
            conn.close()

    def _hung_up(self, pid: Any, conn: Any) -> None:
        """The requester shut its end (a cancel, or it went away): the child is killed;
        its status still goes back once it is reaped."""
        try:
            data = conn.recv(1)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(conn)
            self._kill(int(pid))

    def _kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.loaders.forker")
    parser.add_argument("--listen", required=True, help="Unix socket path to create")
    parser.add_argument("--owned", action="store_true", help="exit when stdin closes")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    missing = _preload(preload())
    if missing:
        log.info("template: not importable here (skipped): %s", ", ".join(missing))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(args.listen)
    finally:
        os.umask(old)
    listener.listen(64)
    forker = Forker(listener, sys.stdin.fileno() if args.owned else None)
    print("ready", flush=True)  # the owner waits for this line
    try:
        forker.serve()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
