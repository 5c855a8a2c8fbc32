"""Keeps a loader template available to the serving process, and says when it is not.

Our own template (BASEHOLD_LOADER_TEMPLATE unset) is started in a private folder, waited
on, and started again when it exits; a start that fails is retried, with backoff. A shared
template is checked (folder, uid, protocol) and watched over a connection it holds open:
when that connection ends, the template is gone until a retry finds it again. /readyz
answers from `liveness()`; while the template is down a load fails at once with
`loader_unavailable`, while it is starting a load waits for it.

`basehold serve` starts our template before it imports the app (`start_early`): the
template's imports (seconds) and the serving process's run side by side, and the first
Template made without an address adopts it instead of starting one.

One thread (the keeper's) starts, waits on and checks the template; the lock is only ever
held to read or change the state, never across a start, a connection or a wait.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from service.common.errors import LoaderUnavailable
from service.common.protocol.job import Job
from service.common.protocol.messages import REPLY_SECONDS, Kind
from service.common.protocol.wire import Channel
from service.serving.loaders import template

log = logging.getLogger("basehold.loaders")

BACKOFF = (1.0, 30.0)  # seconds before the first retry, and the most between two
LIVED = 60.0  # a template that served this long starts the backoff over when it ends


@dataclass(frozen=True)
class Early:
    """A template started before the app was built, not waited on yet."""

    folder: str
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)

    def abandon(self) -> None:
        """The service does not start after all: the template goes with its folder."""
        global _early
        if _early is self:
            _early = None
        template.end(self.process)
        shutil.rmtree(self.folder, ignore_errors=True)


_early: Early | None = None  # taken by the first Template that starts its own


def start_early() -> Early:
    """Start our template now (`basehold serve`, before it imports the app); the first
    Template without an address adopts it."""
    global _early
    folder = tempfile.mkdtemp(prefix="basehold-template-")
    process = template.launch(Path(folder) / SOCKET, owned=True)
    _early = Early(folder, process)
    return _early


SOCKET = "template.sock"  # in our template's private folder


@dataclass(frozen=True)
class Liveness:
    state: Literal["starting", "up", "down"]
    detail: str  # what /readyz and a refused load say


class Template:
    def __init__(
        self,
        address: str | None = None,
        *,
        reply_seconds: float = REPLY_SECONDS,
        start_seconds: float = template.START_SECONDS,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        """`address`: a shared template's socket (None or "": start our own). A shared one
        that cannot be trusted is refused here (`template.TemplateRefused`)."""
        self.shared = address or None
        self.reply_seconds = reply_seconds
        self.start_seconds = start_seconds
        self._backoff = backoff
        template.check_template(self.shared, reply_seconds)
        global _early
        self._early: Early | None = None
        if self.shared is None:
            self._early, _early = _early, None
        self._refused = False  # the last one refused: the next imports everything first
        self._cond = threading.Condition()
        self._liveness = Liveness("starting", self._starting())
        self._address: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._watch: Channel | None = None
        self._folder = self._early.folder if self._early else None
        self._thread: threading.Thread | None = None
        self._closing = False

    # -- what the rest of the service asks ------------------------------------------
    def start(self) -> None:
        """Start keeping the template (once; loads start it too)."""
        with self._cond:
            if self._thread is not None or self._closing:
                return
            self._thread = threading.Thread(target=self._keep, name="loader-template", daemon=True)
            self._thread.start()

    def wait_up(self, timeout: float | None = None) -> bool:
        """Whether the template serves, waiting up to `timeout` (None: until it does, or
        until close)."""
        self.start()
        with self._cond:
            self._cond.wait_for(
                lambda: self._liveness.state == "up" or self._closing, timeout=timeout
            )
            return self._liveness.state == "up"

    def liveness(self) -> Liveness:
        with self._cond:
            return self._liveness

    def spawn(self, kind: Kind, job: Job, channel: socket.socket) -> tuple[int, Channel]:
        """Fork a loader (see `template.spawn`); LoaderUnavailable when the template is down
        or fails to answer."""
        self.start()
        with self._cond:
            self._cond.wait_for(
                lambda: self._liveness.state != "starting" or self._closing,
                timeout=self.start_seconds,
            )
            liveness, address = self._liveness, self._address
        if self.shared is not None:
            address = self.shared  # asked every time: it may be back before the keeper looks
        elif liveness.state != "up" or address is None:
            raise LoaderUnavailable(liveness.detail)
        try:
            return template.spawn(address, kind, job, channel, self.reply_seconds)
        except (template.TemplateUnavailable, template.TemplateRefused) as exc:
            raise LoaderUnavailable(self._unavailable(str(exc))) from None

    def lifeline(self) -> list[int]:
        """New fds of our template's stdin and stdout (the caller closes them): while any
        process holds them, the template runs on (it exits when the last one closes its
        stdin) and can write; a runner handed to a successor keeps its template so. A
        shared template needs none: [] (so does none running)."""
        with self._cond:
            process = self._process
            if process is None or process.stdin is None or process.stdout is None:
                return []
            fds = [os.dup(process.stdin.fileno())]
            try:
                fds.append(os.dup(process.stdout.fileno()))
            except OSError:
                os.close(fds[0])
                raise
            return fds

    def close(self, *, keep_running: bool = False) -> None:
        """Our template exits (its stdin closes); a shared one is left alone.
        `keep_running`: runners it forked were handed to a successor, which holds its
        `lifeline`: this side only closes its end (the template exits once they ended)."""
        with self._cond:
            self._closing = True
            process, watch, thread = self._process, self._watch, self._thread
            self._cond.notify_all()
        if watch is not None:
            watch.close()  # wakes the keeper
        if process is not None and keep_running:
            if process.stdin is not None:
                process.stdin.close()
            thread = None  # it follows the template's output until that ends
        elif process is not None:
            _stop(process)
        early = self._early
        if early is not None and early.process.poll() is None and process is not early.process:
            template.end(early.process)  # never waited on: the keeper never started
        if thread is not None:
            thread.join(15)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    # -- the keeper thread ------------------------------------------------------------
    def _keep(self) -> None:
        delay = self._backoff[0]
        while True:
            began = time.monotonic()
            try:
                ended = self._serve_shared() if self.shared else self._serve_own()
            except (template.TemplateUnavailable, template.TemplateRefused, OSError) as exc:
                ended = str(exc)
            except Exception as exc:  # the keeper never stops: the next try may work
                log.exception("keeping the loader template failed")
                ended = f"{type(exc).__name__}: {exc}"
            with self._cond:
                if self._closing:
                    return
                if time.monotonic() - began > LIVED:
                    delay = self._backoff[0]
                self._liveness = Liveness("down", self._down(ended, delay))
                self._address = None
                self._cond.notify_all()
                log.error("%s", self._liveness.detail)
                self._cond.wait_for(lambda: self._closing, timeout=delay)
                if self._closing:
                    return
                if not self.shared:
                    self._liveness = Liveness("starting", self._starting())
            delay = min(delay * 2, self._backoff[1])

    def _serve_own(self) -> str:
        """Start our template and wait for it to exit; returns how it ended."""
        self._folder = self._folder or tempfile.mkdtemp(prefix="basehold-template-")
        address = Path(self._folder) / SOCKET
        started = time.monotonic()
        early, self._early = self._early, None
        if early is not None:  # started by `basehold serve` before the app: adopt it
            process, started = early.process, early.started
            template.await_ready(process, self.start_seconds)
        else:
            address.unlink(missing_ok=True)
            all_first = self._refused
            process = template.start(
                address, owned=True, timeout=self.start_seconds, all_first=all_first
            )
        if not self._up(str(address), process=process):
            _stop(process)
            return "closing"
        log.info("loader template ready in %.1f s", time.monotonic() - started)
        refused = self._follow(process)
        code = process.wait()
        with self._cond:
            self._process = None
        if process.stdout is not None:
            process.stdout.close()
        self._refused = refused is not None
        if refused is not None:
            return refused
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"it (pid {process.pid}) {how}"

    def _follow(self, process: subprocess.Popen[bytes]) -> str | None:
        """Read what our template says until it exits. `refused: WHY` (an import it did once
        it served initialized CUDA): it forks no more, so it is down at once, saying why;
        it exits once its loaders (which hold models) ended. Returns WHY, if said."""
        refused = None
        for line in template.said(process):
            why = template.refusal(line)
            if why is not None and refused is None:
                refused = why
                with self._cond:
                    self._liveness = Liveness("down", self._unavailable(why))
                    self._address = None
                    self._cond.notify_all()
                log.error("%s", self._liveness.detail)
        return refused

    def _serve_shared(self) -> str:
        """Check the shared template and watch it until it goes; returns why it is down."""
        assert self.shared is not None
        template.check_folder(self.shared)
        watch = template.connect(self.shared, self.reply_seconds, watch=True)
        if not self._up(self.shared, watch=watch):
            watch.close()
            return "closing"
        log.info("the shared loader template at %s answers", self.shared)
        watch.wait_closed()
        with self._cond:
            self._watch = None
        watch.close()
        return f"the shared loader template at {self.shared} went away"

    def _up(
        self,
        address: str,
        process: subprocess.Popen[bytes] | None = None,
        watch: Channel | None = None,
    ) -> bool:
        with self._cond:
            if self._closing:
                return False
            self._process, self._watch, self._address = process, watch, address
            self._liveness = Liveness("up", "")
            self._cond.notify_all()
            return True

    # -- what it says ------------------------------------------------------------------
    def _starting(self) -> str:
        if self.shared:
            return f"Checking the shared loader template ({template.SETTING}); retry shortly."
        return "The loader template is importing torch and transformers (seconds); retry shortly."

    def _down(self, ended: str, delay: float) -> str:
        return self._unavailable(f"{ended.rstrip('.')}; retrying in {delay:g} s")

    def _unavailable(self, why: str) -> str:
        if self.shared:
            return (
                f"The shared loader template at {self.shared} ({template.SETTING}) is "
                f"unavailable ({why.rstrip('.')}). Loads fail until it answers: check that it "
                "runs as this service's user (python -m service.loader.forker --listen "
                f"{self.shared}), or restart it."
            )
        return (
            f"The loader template is unavailable ({why.rstrip('.')}). The service starts it "
            "again; retry shortly, and see the server log if this persists."
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Our template exits when its stdin closes; killed if it does not in time."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()
