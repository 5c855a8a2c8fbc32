"""uvicorn on a port bound before anything else starts, with SIGTERM as the normal way to
stop and the dashboard's polls kept out of the access log."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from types import FrameType
from typing import cast

import anyio.to_thread
import uvicorn
import uvicorn.lifespan.on
import uvicorn.loops.auto
import uvicorn.protocols.http.auto
from fastapi import FastAPI

# (What uvicorn would import as it starts: imported with this module, before a successor
# takes over, not in the takeover's window; anyio's backend comes with the thread-pool call
# `DrainingServer.startup` makes before it. No websockets: the API has none.)
with contextlib.suppress(ImportError):  # the loop uvicorn's "auto" picks, where installed
    import uvicorn.loops.uvloop  # (imports uvloop)

# What the dashboard (every second, per open tab) and probes ask over and over: a 2xx answer
# to one of these GETs is not worth an access-log line. Errors and every other request are.
POLLED = frozenset(
    {"/healthz", "/readyz", "/v1/memory", "/v1/memory/history", "/v1/models", "/v1/leases"}
)


class PortUnavailable(RuntimeError):
    """The HTTP port cannot be bound; the message says which flag to change."""


class QuietPolls(logging.Filter):
    """Drops uvicorn's access line for a polled GET that answered 2xx."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) != 5:  # not an access line
            return True
        _, method, path, _, status = args
        if method != "GET" or str(path).split("?", 1)[0] not in POLLED:
            return True
        return not (isinstance(status, int) and 200 <= status < 300)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the app (and its loader template) starts: a port
    in use stops a second instance before it starts anything (PortUnavailable). It listens
    at once, so a client that connects while the app starts waits instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise PortUnavailable(_bind_failure(host, port, exc)) from None
    return sock


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use (another basehold?): pass another --port"
    if exc.errno == errno.EACCES:
        return f"port {port} needs privileges to bind: pass --port 1024 or above"
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(exc, socket.gaierror):
        return f"cannot listen on {host} (not an address of this machine): pass another --host"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass another --host or --port"


class DrainingServer(uvicorn.Server):
    """On SIGTERM (the orchestrator's stop) drain, unload every model, and exit 0 instead of
    re-raising the signal after shutdown as plain uvicorn does. `on_started` runs once the
    app has started and the socket serves requests; `on_stopping` (in a thread) as the
    shutdown begins, before the app's."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_started: Callable[[], None],
        on_stopping: Callable[[], None],
        take: Callable[[], socket.socket] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._on_stopping = on_stopping
        self._take = take
        self._taken: list[socket.socket] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        if self._take is not None:
            # The app's first thread-pool call starts a worker thread (anyio's, idle for
            # 10 s before it ends): started now, not in the takeover's window.
            await anyio.to_thread.run_sync(lambda: None)
            with _default_signals():  # as before the server: SIGTERM or ^C ends the wait
                self._taken = sockets = [self._take()]
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await asyncio.to_thread(self._on_stopping)
        await super().shutdown(sockets if sockets is not None else self._taken)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)
        # Stop accepting now, not at uvicorn's next tick (up to 100 ms on): after a
        # handover the successor accepts on the same listener, and every connection from
        # now on should reach it.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop_accepting)

    def _stop_accepting(self) -> None:
        for server in self.servers:
            server.close()  # this process's fd of the listener only: never a shutdown()


@contextlib.contextmanager
def _default_signals() -> Iterator[None]:
    """SIGTERM and SIGINT as a process without a server has them, for a while."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str,
    *,
    listener: socket.socket | Callable[[], socket.socket] | None = None,
    on_started: Callable[[], None] = lambda: None,
    on_stopping: Callable[[], None] = lambda: None,
) -> None:
    """Serve on `listener` (from `bind`; bound here when None) until stopped. A callable
    `listener` (a successor's takeover) is called once everything but the app's own start
    is built and running, and returns the socket to serve on; what it raises ends `serve`
    before the app starts."""
    take = listener if callable(listener) else None
    if take is None:
        listener = listener or bind(host, port)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, ws="none", timeout_graceful_shutdown=30
    )
    config.load()  # the app wrapped in uvicorn's middleware: before a takeover, not after
    # uvicorn configured its loggers just now (Config's __init__): filter after that.
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuietPolls) for f in access.filters):
        access.addFilter(QuietPolls())
    server = DrainingServer(config, on_started, on_stopping, take)
    server.run(sockets=None if take is not None else [cast(socket.socket, listener)])
