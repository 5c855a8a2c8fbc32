"""One loader process, seen from the serving process: fork it from the template, talk to
it over its channel, stop or kill it, and say how it ended."""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
from contextlib import suppress
from typing import Any

from service.loaders.job import Job
from service.loaders.template import Template, read_status
from service.loaders.wire import Channel


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
    def __init__(self, template: Template, kind: str, job: Job) -> None:
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
        self._exitcode: int | None = None
        self._lock = threading.Lock()  # the status is read once, by whoever asks first

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        return self.channel.recv()

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(message)

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code once it ended (negative: the signal), None if still running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._exitcode is not None:
                    return self._exitcode
                status = self._status
            # Short slices: another thread may read the status (and close it) meanwhile.
            left = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
            ready, _, _ = select.select([status], [], [], left)
            if ready:
                with self._lock:
                    if self._exitcode is None:
                        self._exitcode = read_status(status)
                        status.close()
                    return self._exitcode
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def ended(self, timeout: float = 5.0) -> str:
        """How it ended, for `loader_crashed` ("was killed by SIGKILL")."""
        return _describe(self.wait(timeout))

    def kill(self) -> None:
        """At once (a cancel): the template kills it when we shut our end of the status
        connection; the kernel takes back everything it held."""
        with self._lock:
            if self._exitcode is None:
                with suppress(OSError):
                    self._status.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Let go of its channel (it ended, or is about to)."""
        self.channel.close()

    def stop(self, timeout: float = 2.0) -> None:
        """A runner's end: close its channel (it exits), killed if it does not in time."""
        self.channel.close()
        if self.wait(timeout) is None:
            self.kill()
            self.wait(timeout)
