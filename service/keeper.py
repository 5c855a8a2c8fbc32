"""The keeper: a small parent process (stdlib only: no torch, no FastAPI, no pydantic) that
runs `basehold serve` as its child and keeps duplicates of what the child holds, so a
crash of the serving process loses no model.

`basehold serve --keeper` (or BASEHOLD_KEEPER=true) runs it. The child gets one end of a
socketpair (fd in BASEHOLD_KEEPER_FD) and speaks the handover protocol's frames on it:

    child -> keeper    hello (its versions), at start
    keeper -> child    offer (+ fds: the HTTP listener, the worker socket's listener and each
                       kept model's arena and segments; what it has), as a predecessor's
    child -> keeper    taken; then `listeners` (+ the two listeners' fds), `keep` (a ready
                       model's entry + its fds) and `drop` (a model unloaded) as they happen

When the child dies of anything but a clean exit (a signal, the OOM killer, an exit code
other than 0 and 2), the keeper starts a new one and offers it everything it kept: the
same HTTP and worker sockets (never unbound) and every model's memory; the new child takes
back the models the state database still lists and restores the rest. Kept models are
offered only to a child of the same versions as the one that sent them. SIGTERM and SIGINT
go to the child (the keeper exits with its status); SIGHUP starts a new child that takes
over from the running one (`--take-over`: an upgrade), whose models then come back to the
keeper from it. As PID 1 it reaps orphans. `/healthz` of the child says how many times the
keeper started it again (`restarts`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from service.common.protocol.keeper import FD_SETTING, RESTARTS_SETTING, network_namespace
from service.common.protocol.wire import BadMessage, Channel, ChannelClosed, close_fds

log = logging.getLogger("basehold.keeper")
REFUSED = 2  # the child refused to start (settings, a port in use): starting again won't help
VERSIONS = ("handover", "state_schema", "handle", "protocol")
BACKOFF = (1.0, 30.0)
LIVED = 60.0


@dataclass
class Kept:
    entry: dict[str, Any]  # the handover's OfferedModel, as JSON
    fds: list[int]


@dataclass
class Holdings:
    """What the keeper holds for the serving process (its own fds)."""

    http: int | None = None
    worker: int | None = None
    models: dict[str, Kept] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)  # of the child that sent them
    lock: threading.Lock = field(default_factory=threading.Lock)

    def offer(self, hello: dict[str, Any], pid: int) -> tuple[dict[str, Any], list[int]]:
        """An offer of new fds of what is kept; its models only to the same versions."""
        with self.lock:
            same = all(hello.get(key) == self.versions.get(key) for key in VERSIONS)
            fds: list[int] = []
            http = self.http is not None and hello.get("netns") == network_namespace()
            if http and self.http is not None:
                fds.append(os.dup(self.http))
            worker = self.worker is not None
            if self.worker is not None:
                fds.append(os.dup(self.worker))
            models = []
            for kept in self.models.values() if same else ():
                fds.extend(os.dup(fd) for fd in kept.fds)
                models.append(kept.entry)
            offer = {
                "type": "offer",
                "pid": pid,
                "http": http,
                "worker": worker,
                "models": models,
            }
            return offer, fds

    def listeners(self, message: dict[str, Any], fds: list[int]) -> None:
        """The child's listening sockets: the HTTP one (where `http`), the worker one."""
        rest = list(fds)
        http = rest.pop(0) if message.get("http") and rest else None
        worker = rest.pop(0) if message.get("worker") and rest else None
        close_fds(rest)
        with self.lock:
            old = [fd for fd in (self.http, self.worker) if fd is not None]
            self.http, self.worker = http, worker
        close_fds(old)

    def keep(self, entry: dict[str, Any], fds: list[int], versions: dict[str, Any]) -> None:
        with self.lock:
            old = self.models.pop(str(entry.get("id")), None)
            self.models[str(entry.get("id"))] = Kept(entry, fds)
            self.versions = versions
        if old is not None:
            close_fds(old.fds)

    def ids(self) -> set[str]:
        with self.lock:
            return set(self.models)

    def drop(self, model_id: str) -> None:
        with self.lock:
            old = self.models.pop(model_id, None)
        if old is not None:
            close_fds(old.fds)

    def close(self) -> None:
        with self.lock:
            fds = [fd for fd in (self.http, self.worker) if fd is not None]
            fds += [fd for kept in self.models.values() for fd in kept.fds]
            self.http, self.worker, self.models = None, None, {}
        close_fds(fds)


class Keeper:
    def __init__(self, argv: list[str]) -> None:
        self.argv = [a for a in argv if a not in ("--keeper", "--take-over")]
        self._take_over = "--take-over" in argv  # the first child takes over, if asked to
        self.holdings = Holdings()
        self.restarts = 0
        self.child: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._handed_over = False  # the child handed everything to a successor elsewhere
        self._successor: list[str] | None = None  # set by SIGHUP: the next child takes over
        # While a SIGHUP successor takes over: the running child, and whether it handed over.
        self._previous: subprocess.Popen[bytes] | None = None
        self._previous_done = False

    # -- the child's channel ------------------------------------------------------------
    def _follow(self, channel: Channel, take_over: bool, child: subprocess.Popen[bytes]) -> None:
        """Answer the child's hello (`take_over`: with nothing, it takes over from a
        running one), then keep what it says it holds, until it goes. What it was offered
        and did not keep once it serves (not in the state database any more, refused)
        is let go."""
        versions: dict[str, Any] = {}
        offered: set[str] = set()  # kept models it must keep again, or they are let go
        said_handed_over = False
        while True:
            try:
                message, fds = channel.recv()
            except (ChannelClosed, BadMessage, OSError):
                channel.close()
                return
            kind = message.get("type")
            if kind == "hello":
                close_fds(fds)
                versions = {key: message.get(key) for key in VERSIONS}
                kept = self.holdings.ids()
                offer, sent = self.holdings.offer(message, os.getpid())
                if take_over:  # it takes over from the running one, and keeps them again
                    close_fds(sent)
                    offer, sent = self._empty(offer), []
                    offered = kept
                else:  # what a child of other versions is not offered, it loads again
                    offered = {str(entry.get("id")) for entry in offer["models"]}
                    for model_id in kept - offered:
                        self.holdings.drop(model_id)
                try:
                    channel.send(offer, sent)
                finally:
                    close_fds(sent)
            elif kind == "listeners":  # it serves: what it did not keep is not kept here
                self.holdings.listeners(message, fds)
                for model_id in offered:
                    self.holdings.drop(model_id)
                offered = set()
            elif kind == "keep" and isinstance(message.get("model"), dict):
                if said_handed_over or self._handed_over:  # what it lets go of after
                    close_fds(fds)
                    continue
                offered.discard(str(message["model"].get("id")))
                self.holdings.keep(message["model"], fds, versions)
            elif kind == "handed_over":
                close_fds(fds)
                said_handed_over = True
                if child is self._previous:  # to the successor this keeper started
                    self._previous_done = True
                elif child is self.child:  # to another keeper's: nothing to keep here
                    self._handed_over = True
                    self.holdings.close()
                    log.info("keeper: pid %d handed over; keeping nothing more", child.pid)
            elif kind == "drop":
                close_fds(fds)
                self.holdings.drop(str(message.get("id")))
            elif kind == "taken":  # the fds are its: answer at once (nothing to undo here)
                close_fds(fds)
                with contextlib.suppress(ChannelClosed, OSError):
                    channel.send({"type": "released"})
            else:
                close_fds(fds)  # something this keeper does not know

    @staticmethod
    def _empty(offer: dict[str, Any]) -> dict[str, Any]:
        return {**offer, "http": False, "worker": False, "models": []}

    def _start(self, take_over: bool = False) -> tuple[subprocess.Popen[bytes], Channel]:
        ours, theirs = socket.socketpair()
        env = {
            **os.environ,
            FD_SETTING: str(theirs.fileno()),
            RESTARTS_SETTING: str(self.restarts),
        }
        command = [sys.executable, "-m", "service", *self.argv]
        if take_over:
            command.append("--take-over")
        # A session of its own: a Ctrl-C in a terminal reaches the keeper alone, which
        # passes it on once (two SIGINTs would make uvicorn skip its graceful shutdown).
        child = subprocess.Popen(
            command, env=env, pass_fds=[theirs.fileno()], start_new_session=True
        )
        theirs.close()
        if not take_over:
            self.child = child  # before its messages are read (`handed_over` asks)
        channel = Channel(ours)
        follow = threading.Thread(
            target=self._follow, args=(channel, take_over, child), daemon=True
        )
        follow.start()
        return child, channel

    # -- signals ----------------------------------------------------------------------------
    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        for child in (self.child, self._previous):  # both, while one takes over
            if child is not None and child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)

    def _reload(self, signum: int, frame: FrameType | None) -> None:
        self._successor = ["--take-over"]

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        signal.signal(signal.SIGHUP, self._reload)
        delay = 0.0  # the first time at once; again soon after: with backoff
        try:
            while True:
                started = time.monotonic()
                self.child, _ = self._start(take_over=self._take_over)
                self._take_over = False
                code = self._wait(self.child)
                if self._handed_over:  # nothing to start again
                    if os.getpid() == 1:  # a container's: it ends when it is stopped
                        log.info("keeper: handed over; waiting to be stopped")
                        self._sleep(float("inf"))
                    return 0
                if self._stopping or code in (0, REFUSED):
                    return code
                if time.monotonic() - started > LIVED:
                    delay = 0.0
                self.restarts += 1
                log.error(
                    "keeper: the serving process (pid %d) %s; starting it again in %.0f s with "
                    "the %d model(s) it held (restart %d)",
                    self.child.pid,
                    _how(code),
                    delay,
                    len(self.holdings.models),
                    self.restarts,
                )
                if self._sleep(delay):
                    return 0
                delay = min(max(delay * 2, BACKOFF[0]), BACKOFF[1])
        finally:
            self.holdings.close()

    def _wait(self, child: subprocess.Popen[bytes]) -> int:
        """Until `child` (the current one) exits: its exit code (negative: the signal).
        Reaps orphans meanwhile (PID 1) and starts a successor on SIGHUP."""
        while True:
            busy = self._previous is not None
            if self._successor is not None and not (self._stopping or self._handed_over or busy):
                self._successor = None
                log.info("keeper: SIGHUP: a new serving process takes over from pid %d", child.pid)
                self._previous, self._previous_done = child, False
                successor, _ = self._start(take_over=True)
                self.child, child = successor, successor  # its messages wait for this
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return child.returncode if child.returncode is not None else 0
            if pid == 0:
                time.sleep(0.05)  # polled: a signal's handler runs between two polls
                continue
            code = os.waitstatus_to_exitcode(status)
            previous = self._previous
            if previous is not None and pid == previous.pid:
                previous.returncode, self._previous = code, None  # it handed over (or died)
            elif pid == child.pid:
                child.returncode = code
                if previous is None or self._previous_done or previous.returncode is not None:
                    self._previous = None
                    return code
                # The successor ended before it took over: the running one goes on.
                log.error(
                    "keeper: the new serving process (pid %d) %s before it took over; pid %d "
                    "goes on serving",
                    child.pid,
                    _how(code),
                    previous.pid,
                )
                self.child, child, self._previous = previous, previous, None

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless told to stop (True: stop)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._stopping:
                return True
            time.sleep(0.05)
        return self._stopping


def _how(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return Keeper(argv).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
