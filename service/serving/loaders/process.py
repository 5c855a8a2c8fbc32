"""One loader process, seen from the serving process: fork it from the template, talk to
it over its channel, stop or kill it, and say how it ended.

Its end has one owner: a reaper thread per process reads the template's word of its exit
(once) and sets an event; any number of threads wait on that event, so none of them ever
reads the status connection or finds it closed under it.

A runner (the process holding a model that cannot be shared) can change hands: a handover
sends new fds of its channel and status connection (and of its template's pipes, which keep
that template running) to a successor, which `adopt`s it; this side then `abandon`s it,
closing its own fds without a word to either process."""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
from contextlib import suppress
from typing import Protocol

from service.common.protocol.job import Job
from service.common.protocol.messages import (
    FROM_LOADER,
    FROM_TEMPLATE,
    REPLY_SECONDS,
    Exited,
    FromLoader,
    Kind,
    Message,
    Stop,
)
from service.common.protocol.wire import (
    BadMessage,
    Channel,
    ChannelClosed,
    ChannelTimeout,
    close_fds,
)


class Spawner(Protocol):
    """What forks loaders (`service.serving.loaders.keeper.Template`)."""

    reply_seconds: float

    def spawn(self, kind: Kind, job: Job, channel: socket.socket) -> tuple[int, Channel]: ...


def _describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


class LoaderProcess:
    def __init__(self, template: Spawner, kind: Kind, job: Job) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid, status = template.spawn(kind, job, child)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._begin(job, pid, Channel(parent), status, template.reply_seconds, [])

    @classmethod
    def adopt(
        cls, job: Job, pid: int, fds: list[int], reply_seconds: float = REPLY_SECONDS
    ) -> LoaderProcess:
        """A runner a predecessor handed over: `fds` are its channel's, its status
        connection's, then its template's lifeline (see `lifeline`); owned from now on."""
        if len(fds) < 2:
            close_fds(fds)
            raise ValueError(f"a runner comes with at least 2 fds, not {len(fds)}")
        socks: list[socket.socket] = []
        try:
            for fd in fds[:2]:
                socks.append(socket.socket(fileno=fd))
        except OSError as exc:
            for sock in socks:
                sock.detach()
            close_fds(fds)
            raise ValueError(f"a runner's fd that is not a socket ({exc})") from None
        for sock in socks:
            sock.setblocking(True)
        process = cls.__new__(cls)
        process._begin(job, pid, Channel(socks[0]), Channel(socks[1]), reply_seconds, fds[2:])
        return process

    def _begin(
        self,
        job: Job,
        pid: int,
        channel: Channel,
        status: Channel,
        reply_seconds: float,
        lifeline: list[int],
    ) -> None:
        self.job = job
        self.pid = pid
        self.channel = channel
        self._status = status
        self._reply_seconds = reply_seconds
        # An adopted runner's template is not this process's: these fds (its pipes) keep
        # it running while the runner does; closed once the runner ended.
        self.lifeline = list(lifeline)
        self._exitcode: int | None = None
        self._ended = threading.Event()
        self._lock = threading.Lock()  # kill() never shuts a status socket being closed
        self._wake_r, self._wake_w = os.pipe()  # `abandon` wakes the reaper
        self._abandoned = False
        self._reaper = threading.Thread(target=self._reap, name=f"loader-{pid}", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        """The one reader of the status connection: the template sends the exit status
        when it reaped the loader; a template that went away counts as SIGKILL. An
        abandoned runner (handed over) is left without an end here."""
        code = -int(signal.SIGKILL)
        try:
            ready, _, _ = select.select([self._status.sock.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return
            message, fds = self._status.receive(FROM_TEMPLATE, self._reply_seconds)
            close_fds(fds)
            if isinstance(message, Exited):
                code = message.status
        except (ChannelClosed, ChannelTimeout, BadMessage, OSError, ValueError):
            pass
        finally:
            os.close(self._wake_r)
        with self._lock:
            if self._abandoned:
                return
            self._exitcode = code
            self._status.close()
            os.close(self._wake_w)
            close_fds(self.lifeline)
            self.lifeline = []
        self._ended.set()

    def handover_fds(self) -> list[int]:
        """New fds of its channel and status connection, for a successor (the caller
        closes them); the lifeline is the caller's to add."""
        fds: list[int] = []
        try:
            for sock in (self.channel.sock, self._status.sock):
                fds.append(os.dup(sock.fileno()))
        except OSError:
            close_fds(fds)
            raise
        return fds

    def abandon(self) -> None:
        """It was handed over: close this side's fds without a word (no shutdown, which
        would end it for the successor too). It never ends here: `wait` blocks on."""
        with self._lock:
            if self._exitcode is not None or self._abandoned:
                return
            self._abandoned = True
            os.write(self._wake_w, b"x")
        self._reaper.join(5)
        os.close(self._wake_w)
        for sock in (self.channel.sock, self._status.sock):
            sock.close()
        close_fds(self.lifeline)
        self.lifeline = []

    def receive(self, timeout: float | None = None) -> tuple[FromLoader, list[int]]:
        """The loader's next message and its fds (see `Channel.receive`)."""
        return self.channel.receive(FROM_LOADER, timeout)

    def send(self, message: Message) -> None:
        self.channel.send(message)

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code once it ended (negative: the signal), None if still running."""
        self._ended.wait(timeout)
        with self._lock:
            return self._exitcode

    def ended(self, timeout: float = 5.0) -> str:
        """How it ended, for `loader_crashed` ("was killed by SIGKILL")."""
        return _describe(self.wait(timeout))

    def kill(self) -> None:
        """At once (a cancel): the template kills it when we shut our end of the status
        connection; the kernel takes back everything it held."""
        with self._lock:
            if self._exitcode is None and not self._abandoned:
                with suppress(OSError):
                    self._status.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Let go of its channel (it ended, or is about to)."""
        self.channel.close()

    def stop(self, timeout: float = 2.0) -> None:
        """A runner's end: tell it, close its channel (it exits), killed if it does not in
        time. (Told first: another process, a keeper, may hold its channel too.)"""
        with suppress(ChannelClosed, OSError):
            self.channel.send(Stop())
        self.channel.close()
        if self.wait(timeout) is None:
            self.kill()
            self.wait(timeout)
