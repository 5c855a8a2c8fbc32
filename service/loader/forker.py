"""The loader template process: `python -m service.loader.forker --listen PATH`.

It imports torch, transformers, accelerate and common model code once (nothing that
initializes CUDA: `service.loader.imports`), then forks one loader per request on its Unix
socket (the same uid only). A request is one connection, in the typed protocol of
`service.common.protocol.messages`: `Hello` both ways (a requester of another protocol
version is told this one's and dropped), then `Spawn` with the job and two fds (the
loader's channel, and the requester's stderr); the answer is
`Spawned` with the loader's pid, then `Exited` when it ends. If the requester hangs up
first, the loader is killed: a loader never outlives the service that asked for it. A
`Hello` with `watch` is kept open and never answered again: its end tells the requester
that the template went away.

The template stays single-threaded, so forking it is safe. It never blocks on one
requester: every connection is read without blocking, a frame at a time, and one that
has not sent a whole request within REPLY_SECONDS is dropped. It exits when its owner
closes its stdin, or on SIGTERM.

It says `ready` once it imported what every load needs (`imports.FIRST`), and imports the
rest (`imports.LATER`) one module at a time while idle (no request for QUIET seconds);
it logs `preloaded in the background` when done. A loader forked before then imports what
its load needs itself.

A template whose imports initialized CUDA cannot fork (every loader it forked would
fail its first CUDA call). One of basehold's own modules: it starts again (exec) without
it and the modules after it; after a background import, the new image keeps the socket
(with the requests waiting on it) and the loaders. Any other (BASEHOLD_LOADER_PRELOAD):
it refuses, saying `refused: WHY` (instead of `ready`, or after it when a background
import did it) and logging it; after a background import it answers every Spawn with
that, and exits with REFUSED once its loaders (which hold models) ended.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import logging
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from service.common.protocol.messages import (
    PROTOCOL_VERSION,
    REPLY_SECONDS,
    TO_TEMPLATE,
    Exited,
    Hello,
    Message,
    Refused,
    Spawn,
    Spawned,
)
from service.common.protocol.wire import (
    BadMessage,
    ChannelClosed,
    FrameReader,
    close_fds,
    encode,
    parse,
)
from service.common.socket_protocol import peer_credentials
from service.loader.imports import (
    PRELOAD,
    SKIP,
    CudaInitialized,
    import_before_fork,
    import_checked,
    preload,
)

log = logging.getLogger("basehold.template")

_PR_SET_PDEATHSIG = 1
QUIET = 1.0  # seconds without a request before the next background import
REFUSED = 3  # the exit code of a template that refused to serve (its imports initialized CUDA)


def _cuda_refusal(module: str) -> str:
    """What the serving side shows (its log, /readyz) when importing `module` initialized
    CUDA in the template."""
    fix = (
        "it was imported before the preload (sitecustomize, PYTHONSTARTUP?): remove that"
        if module.startswith("(")
        else "remove it from BASEHOLD_LOADER_PRELOAD (a loader imports what its load needs "
        "after the fork)"
    )
    return (
        f"the loader template refuses to serve: importing {module} initialized CUDA, and a "
        "loader forked from it could not use CUDA (Cannot re-initialize CUDA in forked "
        f"subprocess); {fix}"
    )


_FORKS = itertools.count()  # fork_sharing_heap's calls in this process


def fork_sharing_heap() -> int:
    """`os.fork()`, with every object this process holds frozen first (`gc.freeze`): the
    child's collections never visit them. Otherwise the loader's first full collection
    writes to the GC header of every object it inherited, copying each page of the
    template's heap (hundreds of MiB of page faults, which slow the load and the arena
    copy running beside it). From the second fork on, the objects made since the last one
    are collected first (only they are scanned), so garbage is never frozen for good;
    the first fork skips it (a full collection of the preloaded heap takes ~0.3 s).
    Whether one came before is counted here: `gc.get_freeze_count()` walks every frozen
    object (~40 ms of a preloaded template's, at each fork)."""
    if next(_FORKS):
        gc.collect()
    gc.freeze()
    return os.fork()


def _reply(conn: socket.socket, message: Message) -> bool:
    """Send a small answer (it fits the socket's buffer, so this never waits long)."""
    try:
        conn.settimeout(1.0)
        conn.sendall(encode(message, 0))
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            conn.setblocking(False)


def _child(spawn: Spawn, fds: list[int], closing: list[int]) -> None:
    """In the forked child: become the loader (never returns)."""
    code = 1
    channel_fd, stderr_fd = fds
    try:
        close_fds(closing)
        os.dup2(stderr_fd, 1)
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the template went: so do we
        from service.loader import entry

        sock = socket.socket(fileno=channel_fd)
        sock.setblocking(True)
        entry.run(spawn.kind, sock, spawn.job)
        code = 0
    except BaseException:
        log.exception("loader child failed before it could report")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class _Pending:
    """A requester's connection until it sent its whole request."""

    conn: socket.socket
    deadline: float
    reader: FrameReader = field(default_factory=lambda: FrameReader(max_fds=2))
    greeted: bool = False


@dataclass(frozen=True)
class _Loader:
    pid: int  # the requester's connection now waits for its end


class _Watch:
    """A requester's liveness watch: held open until either side goes."""


class Forker:
    def __init__(
        self, listener: socket.socket, owner: int | None, later: list[str] | None = None
    ) -> None:
        self.listener = listener
        self.owner = owner  # the owner's stdin: EOF means the owner is gone
        self.later = list(later or [])  # imported while idle, one per pass of the loop
        self.later_seconds = 0.0
        # When the last connection was accepted (monotonic); from the start, so that the
        # first request after `ready` never waits for an import.
        self.last_request = time.monotonic()
        self.cuda: CudaInitialized | None = None  # a background import initialized CUDA
        self.restart = False  # ... one of basehold's own: start again (exec), now
        self.refusal = ""  # ... any other: what a Spawn is answered until the loop ends
        self.children: dict[int, socket.socket] = {}  # pid -> its requester's connection
        self.pending: dict[socket.socket, _Pending] = {}
        self.watches: set[socket.socket] = set()
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        self.stopping = False

    def serve(self) -> None:
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "signal")
        if self.owner is not None:
            self.selector.register(self.owner, selectors.EVENT_READ, "owner")
        while not self.stopping:
            if self.cuda is not None and (self.restart or not self.children):
                break  # it cannot fork any more: main() starts again or refuses
            events = self.selector.select(self._timeout())
            for key, _ in events:
                data = key.data
                if data == "accept":
                    self._accept()
                elif data == "signal":
                    self._signals()
                elif data == "owner":
                    if not os.read(self.owner or 0, 4096):
                        self.stopping = True
                elif isinstance(data, _Pending):
                    self._read(data)
                elif isinstance(data, _Loader):
                    self._hung_up(data.pid, self.children.get(data.pid))
                elif isinstance(data, _Watch):
                    self._watch_read(key.fileobj)  # type: ignore[arg-type]
            self._expire()
            if not events and self._idle():
                self._import_next()
        if not self.restart or self.stopping:  # an exec keeps them (handover)
            for pid in list(self.children):
                self._kill(pid)

    def _idle(self) -> bool:
        """Whether to import the next background module: no request is being read, and
        none came for QUIET seconds (a load's estimate and load, or a burst of loads, is
        not slowed down by imports; one that comes waits for one import at most). Loaders
        may run: one holds its model as long as it is loaded."""
        return self._quiet_in() == 0.0

    def _quiet_in(self) -> float | None:
        """Seconds until the next background import (None: none to do, or a request is
        being read)."""
        if not self.later or self.pending:
            return None
        return max(0.0, self.last_request + QUIET - time.monotonic())

    def _timeout(self) -> float | None:
        quiet = self._quiet_in()  # 0: import the next one unless a request is there
        if not self.pending:
            return quiet
        return max(0.0, min(p.deadline for p in self.pending.values()) - time.monotonic())

    def _import_next(self) -> None:
        """Import the next background module; never in a thread: forking with a second
        thread alive is unsafe."""
        name = self.later.pop(0)
        began = time.monotonic()
        try:
            if not import_checked(name):
                log.info("template: not importable here (skipped): %s", name)
        except CudaInitialized as exc:
            self._cuda_initialized(exc)
        except Exception:  # a loader that needs it imports it, and says why it fails
            log.warning("template: importing %s failed (skipped)", name, exc_info=True)
        self.later_seconds += time.monotonic() - began
        if self.cuda is None and not self.later:
            log.info("template: preloaded in the background (%.1f s)", self.later_seconds)

    def _cuda_initialized(self, exc: CudaInitialized) -> None:
        """A background import initialized CUDA: no more forks. One of basehold's own: it
        starts again (main(), exec) keeping its loaders and the requests waiting on its
        socket. Any other: it says `refused: WHY`, answers every Spawn with it, and exits
        once its loaders (which hold models) ended."""
        log.error("template: importing %s initialized CUDA: it forks no more", exc.module)
        self.cuda = exc
        self.later.clear()
        self.restart = _own(exc.module)
        if not self.restart:
            self.refusal = _refuse(exc.module)

    def handover(self) -> list[str]:
        """Before it starts again (exec): the arguments that hand its loaders (pid and the
        requester's connection) to the new image; requests being read are dropped."""
        for conn in [*self.pending, *self.watches]:
            self._drop(conn)
        adopt = []
        for pid, conn in self.children.items():
            os.set_inheritable(conn.fileno(), True)
            adopt += ["--adopt", f"{pid}:{conn.fileno()}"]
        return adopt

    def adopt(self, loaders: list[str]) -> None:
        """Take over the loaders of the image it started again from (`handover`)."""
        for entry in loaders:
            pid, fd = (int(part) for part in entry.split(":"))
            conn = socket.socket(fileno=fd)
            conn.setblocking(False)
            self.children[pid] = conn
            self.selector.register(conn, selectors.EVENT_READ, _Loader(pid))
        self._reap()  # those that ended meanwhile

    def _expire(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self.pending.values() if p.deadline <= now]:
            log.warning("template: a requester sent no whole request in %g s", REPLY_SECONDS)
            self._drop(pending.conn)

    def _drop(self, conn: socket.socket) -> None:
        self.pending.pop(conn, None)
        self.watches.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        _, uid, _ = peer_credentials(conn)
        if uid != os.getuid():
            log.warning("template: refused a connection from uid %d", uid)
            conn.close()
            return
        conn.setblocking(False)
        self.last_request = time.monotonic()
        pending = _Pending(conn, time.monotonic() + REPLY_SECONDS)
        self.pending[conn] = pending
        self.selector.register(conn, selectors.EVENT_READ, pending)

    def _read(self, pending: _Pending) -> None:
        """Read what this requester sent so far; act on each whole message."""
        while pending.conn in self.pending:
            try:
                got = pending.reader.step(pending.conn)
            except BlockingIOError:
                return
            except (ChannelClosed, BadMessage, OSError) as exc:
                if not isinstance(exc, ChannelClosed):
                    log.warning("template: a bad request: %s", exc)
                self._drop(pending.conn)
                return
            if got is not None:
                self._request(pending, *got)

    def _request(self, pending: _Pending, data: dict[str, object], fds: list[int]) -> None:
        try:
            message = parse(TO_TEMPLATE, data, fds)
        except BadMessage as exc:
            log.warning("template: a bad request: %s", exc)
            _reply(pending.conn, Refused(reason=f"not a request of this protocol: {exc}"))
            self._drop(pending.conn)
            return
        if not pending.greeted:
            if not isinstance(message, Hello) or fds:
                close_fds(fds)
                _reply(pending.conn, Hello(protocol=PROTOCOL_VERSION))
                self._drop(pending.conn)
                return
            answered = _reply(pending.conn, Hello(protocol=PROTOCOL_VERSION))
            if not answered or message.protocol != PROTOCOL_VERSION:
                self._drop(pending.conn)  # it sees our version and gives up
            elif message.watch:
                self.pending.pop(pending.conn)
                self.watches.add(pending.conn)
                self.selector.modify(pending.conn, selectors.EVENT_READ, _Watch())
            else:
                pending.greeted = True
            return
        if not isinstance(message, Spawn) or len(fds) != 2:
            close_fds(fds)
            _reply(pending.conn, Refused(reason="a spawn comes with the channel and stderr fds"))
            self._drop(pending.conn)
            return
        if self.cuda is not None:  # it must not fork any more
            close_fds(fds)
            _reply(pending.conn, Refused(reason=self.refusal))
            self._drop(pending.conn)
            return
        self.pending.pop(pending.conn)
        self.selector.unregister(pending.conn)
        self._fork(pending.conn, message, fds)

    def _fork(self, conn: socket.socket, spawn: Spawn, fds: list[int]) -> None:
        closing = [
            self.listener.fileno(),
            self.wake_r,
            self.wake_w,
            self.selector.fileno(),
            conn.fileno(),
            *(c.fileno() for c in self.children.values()),
            *(c.fileno() for c in self.pending),
            *(c.fileno() for c in self.watches),
        ]
        if self.owner is not None:
            closing.append(self.owner)
        pid = fork_sharing_heap()
        if pid == 0:
            _child(spawn, fds, closing)
        close_fds(fds)
        self.children[pid] = conn
        if not _reply(conn, Spawned(pid=pid)):
            self._kill(pid)  # its status goes nowhere; it is reaped all the same
            return
        self.selector.register(conn, selectors.EVENT_READ, _Loader(pid))

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
            _reply(conn, Exited(status=os.waitstatus_to_exitcode(status)))
            conn.close()

    def _hung_up(self, pid: int, conn: socket.socket | None) -> None:
        """The requester shut its end (a cancel, or it went away): the loader is killed;
        its status still goes back once it is reaped."""
        if conn is None:
            return
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(conn)
            self._kill(pid)

    def _watch_read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)

    def _kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _again_without(module: str, argv: list[str], listener: int | None, adopt: list[str]) -> None:
    """Start again (exec) without preloading `module` of basehold's own list and what
    follows it there, which may import it (the loaders import them after the fork);
    `listener`: the socket to serve, kept with the requests waiting on it; `adopt`: the
    loaders it takes over (`Forker.handover`)."""
    skipped = ",".join(PRELOAD[PRELOAD.index(module) :])
    log.warning(
        "template: importing %s initialized CUDA here; starting again without "
        "preloading it or the modules after it (%s=%s)",
        module,
        SKIP,
        skipped,
    )
    os.environ[SKIP] = skipped
    sys.stdout.flush()
    sys.stderr.flush()
    if listener is not None:
        os.set_inheritable(listener, True)
        argv = [*argv, "--listen-fd", str(listener), *adopt]
    os.execv(sys.executable, [sys.executable, "-m", "service.loader.forker", *argv])


def _refuse(module: str) -> str:
    """Say why it refuses to serve (instead of `ready`, or after it): the owner shows it."""
    reason = _cuda_refusal(module)
    log.error("%s", reason)
    print(f"refused: {reason}", flush=True)
    return reason


def _own(module: str) -> bool:
    """Whether `module` is on basehold's own list, and this is the first start (at most one
    start again)."""
    return module in PRELOAD and not os.environ.get(SKIP)


def _listen(args: argparse.Namespace) -> socket.socket:
    if args.listen_fd is not None:  # a template started again: its socket, still bound
        return socket.socket(fileno=args.listen_fd)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(args.listen)
    finally:
        os.umask(old)
    listener.listen(64)
    return listener


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.loader.forker")
    parser.add_argument("--listen", required=True, help="Unix socket path to create")
    parser.add_argument("--owned", action="store_true", help="exit when stdin closes")
    parser.add_argument(
        "--all-first", action="store_true", help="import everything before saying ready"
    )
    # A template started again after a background import initialized CUDA (exec): its
    # socket, and its loaders (pid:fd of the requester's connection).
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--adopt", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rest = list(sys.argv[1:] if argv is None else argv)
    if args.listen_fd is not None:  # `--listen-fd N` and the loaders end the arguments
        rest = rest[: rest.index("--listen-fd")]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    first, later = preload()
    if args.all_first:
        first, later = [*first, *later], []
    try:
        missing = import_before_fork(first)
    except CudaInitialized as exc:
        if _own(exc.module):
            _again_without(exc.module, rest, None, [])
        _refuse(exc.module)
        return REFUSED
    if missing:
        log.info("template: not importable here (skipped): %s", ", ".join(missing))
    listener = _listen(args)
    forker = Forker(listener, sys.stdin.fileno() if args.owned else None, later)
    forker.adopt(args.adopt)
    print("ready", flush=True)  # the owner waits for this line
    try:
        forker.serve()
        if forker.cuda is not None and not forker.stopping:
            if forker.restart:
                _again_without(forker.cuda.module, rest, listener.fileno(), forker.handover())
            return REFUSED
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
