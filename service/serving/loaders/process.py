"""One loader process, seen from the serving process: fork it from the template, talk to
it over its channel, stop or kill it, and say how it ended.

Its end has one owner: a reaper thread per process reads the template's word of its exit
(once) and sets an event; any number of threads wait on that event, so none of them ever
reads the status connection or finds it closed under it."""

from __future__ import annotations

import signal
import socket
import threading
from contextlib import suppress
from typing import Protocol

from service.common.protocol.job import Job
from service.common.protocol.messages import (
    FROM_LOADER,
    FROM_TEMPLATE,
    Exited,
    FromLoader,
    Kind,
    Message,
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
        self.job = job
        try:
            self.pid, self._status = template.spawn(kind, job, child)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.channel = Channel(parent)
        self._reply_seconds = template.reply_seconds
        self._exitcode: int | None = None
        self._ended = threading.Event()
        self._lock = threading.Lock()  # kill() never shuts a status socket being closed
        threading.Thread(target=self._reap, name=f"loader-{self.pid}", daemon=True).start()

    def _reap(self) -> None:
        """The one reader of the status connection: the template sends the exit status
        when it reaped the loader; a template that went away counts as SIGKILL."""
        code = -int(signal.SIGKILL)
        try:
            self._status.wait_readable()
            message, fds = self._status.receive(FROM_TEMPLATE, self._reply_seconds)
            close_fds(fds)
            if isinstance(message, Exited):
                code = message.status
        except (ChannelClosed, ChannelTimeout, BadMessage, OSError):
            pass
        with self._lock:
            self._exitcode = code
            self._status.close()
        self._ended.set()

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
            if self._exitcode is None:
                with suppress(OSError):
                    self._status.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Let go of its channel (it ended, or is about to)."""
        self.channel.close()

    def stop(self, timeout: float = 2.0) -> None:
        """A runner's end: close its channel (it exits), killed if it does not in time."""
        self.channel.close()
        if self.wait(timeout) is None:
            self.kill()
            self.wait(timeout)
