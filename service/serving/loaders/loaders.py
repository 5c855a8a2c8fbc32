"""Loads as processes: start a loader from the template, follow its messages (progress,
admission, the manifest), and turn how it ended into a state.

What a loader says is checked, never trusted further: every message is typed
(`service.common.protocol.messages`) and one that is not a message of the protocol (or brings the
wrong fds) fails that load, its fds closed; a loader that says nothing for
`stall_seconds` is killed (`loader_stalled`); the socket and uid workers are sent to are
this process's, whatever the manifest says."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from service.common.cuda import CudaProbe
from service.common.errors import LoaderCrashed, LoaderStalled, relayed
from service.common.estimates import Estimate
from service.common.load.pin import HubPin
from service.common.load.progress import Progress
from service.common.load.sources import HubOptions, hub_cache_dir, within
from service.common.load.spec import LoadRequest
from service.common.protocol.held import Held, Manifest
from service.common.protocol.job import Job, StandIn, hub_env
from service.common.protocol.messages import (
    REPLY_SECONDS,
    Estimated,
    Failed,
    FromLoader,
    Go,
    Prepared,
    Progressed,
    Ready,
    Stop,
)
from service.common.protocol.wire import BadMessage, ChannelClosed, ChannelTimeout, close_fds
from service.serving.loaders.arenas import HeldArenas
from service.serving.loaders.keeper import Liveness, Template
from service.serving.loaders.process import LoaderProcess

log = logging.getLogger("basehold.loaders")


@dataclass(frozen=True)
class LoaderSetup:
    roots: list[Path]
    offload_root: Path
    socket: Path  # the worker socket, named in handles
    cuda: CudaProbe | None  # None: the loader asks torch
    hub: HubOptions = field(default_factory=HubOptions)
    segments: Any = None  # a DeviceSegments stand-in (tests); None: CUDA in the loader
    threads: int = 1
    template: str | None = None  # a running template's socket (else the service starts one)
    memory_limit: int | None = None  # per loader, beyond the template's address space
    stall_seconds: float = 300.0  # a loader silent this long is killed (loader_stalled)
    reply_seconds: float = REPLY_SECONDS  # the template's answer to a connection


class Loaders:
    def __init__(self, setup: LoaderSetup) -> None:
        """Refuses a shared template that cannot be trusted (`template.TemplateRefused`)."""
        self.setup = setup
        self.arenas = HeldArenas()
        self.template = Template(setup.template, reply_seconds=setup.reply_seconds)
        self._handed: set[str] = set()  # load ids a successor holds now
        self._runners_handed = False  # ... some of them runners forked by our template

    def warm(self) -> None:
        """Start the loader template (torch and friends import there, ~5 s on a small
        node; a shared one is checked) and return once it serves, or at close. /readyz
        follows it from then on; it is started again whenever it exits."""
        self.template.wait_up()

    def liveness(self) -> Liveness:
        """Whether the template serves (`state` "up"), and what to say while it does not."""
        return self.template.liveness()

    @property
    def roots(self) -> list[Path]:
        return self.setup.roots

    def _job(
        self,
        model_id: str,
        load_id: str,
        spec: LoadRequest,
        token: str | None,
        admitted: bool,
        *,
        server_token: bool = True,
        pin: HubPin | None = None,
    ) -> Job:
        setup = self.setup
        return Job(
            model_id=model_id,
            load_id=load_id,
            spec=spec,
            token=token,
            roots=setup.roots,
            offload_root=setup.offload_root,
            hub=setup.hub,
            socket=str(setup.socket),
            cuda=StandIn.of(setup.cuda),
            segments=StandIn.of(setup.segments),
            admitted=admitted,
            pin=pin,
            threads=setup.threads,
            memory_limit=setup.memory_limit,
            hub_env=hub_env(server_token=server_token),
            server_token=server_token,
            stall_seconds=setup.stall_seconds,
        )

    def estimate(
        self, spec: LoadRequest, token: str | None, *, full: bool, server_token: bool = True
    ) -> Estimate:
        """What `spec` would take, priced in a helper process of the template. `full`: what
        admission at POST needs (a local checkpoint checked; a hub source's commit, file
        list, config and safetensors headers, and the cache's free disk; nothing
        downloaded); else the config alone (hub sources fetch config.json only).
        `server_token`: without a `token`, the server's own hub token may be used."""
        job = self._job("", "", spec, token, False, server_token=server_token)
        helper = LoaderProcess(self.template, "prepare" if full else "estimate", job)
        what = "The estimate's helper process"
        try:
            message, fds = self._next(helper, what)
            close_fds(fds)
        finally:
            helper.stop()
        if isinstance(message, Failed):
            raise relayed(message.code, message.message, message.status)
        if isinstance(message, Estimated):
            return self._valued(helper, message, what)
        raise self._unreadable(helper, what, f"{message.type} instead of an estimate")

    def prepare(
        self, model_id: str, load_id: str, spec: LoadRequest, token: str | None
    ) -> tuple[LoaderProcess, Estimate]:
        """Fork a load that is not admitted yet and read up to its estimate: it resolved
        and checked the checkpoint (a hub source: its metadata, nothing downloaded) and
        waits for `go` (or the channel's end) before it reads a weight."""
        loader = LoaderProcess(
            self.template, "load", self._job(model_id, load_id, spec, token, False)
        )
        what = f"The loader process of {model_id}"
        try:
            while True:
                message, fds = self._next(loader, what)
                close_fds(fds)
                if isinstance(message, Prepared):
                    return loader, self._valued(loader, message, what)
                if isinstance(message, Failed):
                    raise relayed(message.code, message.message, message.status)
                if not isinstance(message, Progressed):  # resolving: nothing to show yet
                    raise self._unreadable(loader, what, f"{message.type} before its estimate")
        except BaseException:
            loader.kill()
            loader.wait(5)
            loader.close()
            raise

    @staticmethod
    def go(loader: LoaderProcess) -> bool:
        try:
            loader.send(Go())
        except (ChannelClosed, OSError):
            return False
        return True

    def start(
        self,
        model_id: str,
        load_id: str,
        spec: LoadRequest,
        token: str | None,
        admitted: bool,
        pin: HubPin | None = None,
    ) -> LoaderProcess:
        """Fork a load. `pin`: the hub snapshot admission priced, which it downloads."""
        job = self._job(model_id, load_id, spec, token, admitted, pin=pin)
        return LoaderProcess(self.template, "load", job)

    def drive(
        self, loader: LoaderProcess, progress: Progress, admit: Callable[[Estimate], None]
    ) -> Held:
        """Follow a load to its manifest. `admit` raises if the load may not go on (the
        loader is then told to stop). Raises the load's own error, `LoadCancelled` once
        `progress.cancel` is set, `LoaderCrashed` when the process died or said something
        this side cannot read, `LoaderStalled` when it said nothing for too long."""
        what = f"The loader process of {loader.job.model_id}"
        while True:
            message, fds = self._next(loader, what, progress)
            if isinstance(message, Ready):
                return self._held(loader, message, fds, what)
            if isinstance(message, Progressed):
                progress.mirror(message.phase.value, message.bytes_done, message.bytes_total)
            elif isinstance(message, Prepared):
                estimate = self._valued(loader, message, what)
                try:
                    admit(estimate)
                except BaseException:
                    with suppress(ChannelClosed):
                        loader.send(Stop())
                    raise
                loader.send(Go())
            elif isinstance(message, Failed):
                raise relayed(message.code, message.message, message.status)
            else:
                raise self._unreadable(loader, what, f"{message.type} during a load")

    def _next(
        self, loader: LoaderProcess, what: str, progress: Progress | None = None
    ) -> tuple[FromLoader, list[int]]:
        """The loader's next message and its fds: only a manifest brings any."""
        stall = self.setup.stall_seconds
        try:
            message, fds = loader.receive(stall)
        except ChannelTimeout:
            loader.kill()
            if progress is not None:
                progress.check_cancelled()
            raise LoaderStalled(
                f"{what} sent nothing for {stall:g} s (BASEHOLD_LOADER_STALL_SECONDS) and was "
                "killed; a hub download or a disk may be stuck. Load it again; if its loads "
                "are quiet that long on purpose, raise the setting. See the server log."
            ) from None
        except ChannelClosed:
            if progress is not None:
                progress.check_cancelled()
            raise LoaderCrashed(
                f"{what} {loader.ended()}; nothing else was affected. Load it again; if it "
                "keeps crashing, see the server log."
            ) from None
        except BadMessage as exc:
            if progress is not None:
                progress.check_cancelled()
            raise self._unreadable(loader, what, str(exc)) from None
        if not isinstance(message, Ready) and fds:
            close_fds(fds)
            raise self._unreadable(loader, what, f"{len(fds)} fd(s) with {message.type}")
        return message, fds

    def _held(self, loader: LoaderProcess, ready: Ready, fds: list[int], what: str) -> Held:
        try:
            held = self._placed(ready.facts, fds, loader.job.spec)
        except ValueError as exc:
            raise self._unreadable(loader, what, str(exc)) from None
        self.arenas.add(loader.job.load_id, held, fds, loader)
        return held

    def adopt(
        self,
        model_id: str,
        load_id: str,
        spec: LoadRequest,
        facts: Manifest,
        fds: list[int],
        runner: int | None = None,
    ) -> tuple[Held, LoaderProcess | None]:
        """Keep a model a predecessor held and handed over, as if its load had just handed
        it over: its arena and segment fds, or (`runner`: its pid) the runner holding it,
        by its channel, status connection and template lifeline (`handover_fds`); returns
        the runner adopted, if any. ValueError (its fds closed) when the fds do not match
        the manifest."""
        if not facts.shareable:
            if runner is None:
                close_fds(fds)
                raise ValueError("a model that is not shareable comes with its runner")
            try:
                held = self._placed(facts, [], spec)
            except ValueError:
                close_fds(fds)
                raise
            job = self._job(model_id, load_id, spec, None, True)
            process = LoaderProcess.adopt(job, runner, fds, self.setup.reply_seconds)
            self.arenas.add(load_id, held, [], process)
            return held, process
        held = self._placed(facts, fds, spec)
        handle = held.placed.handle
        if handle is None:
            close_fds(fds)
            raise ValueError("a shareable model without its handle")
        size = os.fstat(fds[0]).st_size
        if size < handle.arena.size:
            close_fds(fds)
            raise ValueError(f"its arena fd holds {size} bytes, {handle.arena.size} due")
        self.arenas.add(load_id, held, fds, None)
        return held, None

    def handover_fds(self, load_id: str) -> tuple[list[int], int | None]:
        """New fds of what holds a ready model, for a successor (the caller closes them),
        and its runner's pid: a shareable model's arena and segments, or its runner's
        channel, status connection and the lifeline of the template it was forked from."""
        runner = self.arenas.runner(load_id)
        if runner is None:
            return self.arenas.dup_fds(load_id), None
        fds = runner.handover_fds()
        try:
            if runner.lifeline:  # adopted: its template is not ours
                fds += [os.dup(fd) for fd in runner.lifeline]
            else:
                fds += self.template.lifeline()
        except OSError:
            close_fds(fds)
            raise
        return fds, runner.pid

    def handed(self, load_ids: list[str]) -> None:
        """A successor holds these loads now: discarding them here only closes this
        side's fds (their runners and offload folders are the successor's)."""
        self._handed.update(load_ids)
        self._runners_handed = self._runners_handed or any(
            (runner := self.arenas.runner(i)) is not None and not runner.lifeline for i in load_ids
        )

    def _placed(self, facts: Manifest, fds: list[int], spec: LoadRequest) -> Held:
        """A manifest and its fds as this process serves them; ValueError (fds closed)
        when they do not go together."""
        held = Held.from_manifest(facts)
        expected = 1 + held.segments if held.placed.shareable else 0
        if len(fds) != expected:
            close_fds(fds)
            raise ValueError(f"a manifest with {len(fds)} fds, {expected} due")
        # Workers are sent to this process's socket, checked against this process's uid,
        # and a checkpoint's small files are served from where this process allows.
        allowed = self._allowed(spec)
        if not within(held.checkpoint.resolve(), allowed):
            close_fds(fds)
            shown = ", ".join(str(a) for a in allowed)
            raise ValueError(f"a checkpoint folder {str(held.checkpoint)[:200]!r} outside {shown}")
        return replace(held.served_by(str(self.setup.socket), os.getuid()), allowed=allowed)

    def _allowed(self, spec: LoadRequest) -> tuple[Path, ...]:
        """Where a load of `spec` may serve files from: the model roots (a local source) or
        the HF cache (a hub source), as this process sees them."""
        if spec.source.startswith("/"):  # a local path (as `parse_source` tells them apart)
            return tuple(root.resolve() for root in self.roots)
        return (Path(hub_cache_dir()).resolve(),)

    def _valued(self, loader: LoaderProcess, message: Prepared | Estimated, what: str) -> Estimate:
        try:
            return message.value()
        except BadMessage as exc:
            raise self._unreadable(loader, what, str(exc)) from None

    @staticmethod
    def _unreadable(loader: LoaderProcess, what: str, why: str) -> LoaderCrashed:
        """A loader that broke the protocol is stopped; its load fails, nothing else."""
        loader.kill()
        log.error("%s broke the loader protocol: %s", what, why)
        return LoaderCrashed(
            f"{what} sent a message this service cannot read ({why}) and was stopped; nothing "
            "else was affected. Load it again; if it keeps happening, see the server log."
        )

    def close(self) -> None:
        """At shutdown, after every model was let go: the template exits."""
        self.arenas.close()
        self.template.close(keep_running=self._runners_handed)

    def discard(self, load_id: str, keep_until: datetime | None = None) -> None:
        """Remove what a load left: its offload folder, its arena fd, its runner (now, or
        at `keep_until` when revoked leases may still read its device segments)."""
        if load_id in self._handed:
            self.arenas.release(load_id, handed=True)
            return
        self.arenas.release(load_id, keep_until)
        shutil.rmtree(self.setup.offload_root / load_id, ignore_errors=True)
