"""Loads as processes: start a loader from the template, follow its messages (progress,
admission, the manifest), and turn how it ended into a state."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from service.errors import LoaderCrashed, relayed
from service.loaders.arenas import HeldArenas
from service.loaders.held import Held
from service.loaders.job import Job, hub_env
from service.loaders.process import LoaderProcess
from service.loaders.template import Template
from service.loaders.wire import ChannelClosed
from service.loading.progress import Progress
from service.loading.sources import HubOptions
from service.loading.spec import LoadRequest
from service.memory.admission import Estimate
from service.memory.cuda import CudaProbe

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


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Loaders:
    def __init__(self, setup: LoaderSetup) -> None:
        self.setup = setup
        self.arenas = HeldArenas()
        self.template = Template(setup.template)
        self.template_ready = threading.Event()

    def warm(self) -> None:
        """Start the loader template (torch and friends import there, ~5 s on a small
        node); /readyz waits for it. A failure is logged; loads then start it again."""
        started = time.monotonic()
        try:
            self.template.ensure()
        except Exception:
            log.exception("the loader template did not start; loads will try again")
            return
        log.info("loader template ready in %.1f s", time.monotonic() - started)
        self.template_ready.set()

    @property
    def roots(self) -> list[Path]:
        return self.setup.roots

    def _job(
        self, model_id: str, load_id: str, spec: LoadRequest, token: str | None, admitted: bool
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
            cuda=setup.cuda,
            segments=setup.segments,
            admitted=admitted,
            threads=setup.threads,
            memory_limit=setup.memory_limit,
            hub_env=hub_env(),
        )

    def estimate(self, spec: LoadRequest, token: str | None, *, full: bool) -> Estimate:
        """What `spec` would take, priced in a helper process of the template. `full`: what
        admission at POST needs (a local checkpoint checked; a hub source's commit, file
        list, config and safetensors headers, and the cache's free disk; nothing
        downloaded); else the config alone (hub sources fetch config.json only)."""
        job = self._job("", "", spec, token, False)
        helper = LoaderProcess(self.template, "prepare" if full else "estimate", job)
        try:
            message, fds = helper.recv()
            _close(fds)
        except ChannelClosed:
            raise LoaderCrashed(
                f"The estimate's helper process {helper.ended()}; see the server log."
            ) from None
        finally:
            helper.stop()
        if message.get("type") == "failed":
            raise relayed(message["code"], message["message"], int(message["status"]))
        return Estimate.from_json(message["estimate"])

    def start(
        self, model_id: str, load_id: str, spec: LoadRequest, token: str | None, admitted: bool
    ) -> LoaderProcess:
        return LoaderProcess(
            self.template, "load", self._job(model_id, load_id, spec, token, admitted)
        )

    def drive(
        self, loader: LoaderProcess, progress: Progress, admit: Callable[[Estimate], None]
    ) -> Held:
        """Follow a load to its manifest. `admit` raises if the load may not go on (the
        loader is then told to stop). Raises the load's own error, `LoadCancelled` once
        `progress.cancel` is set, or `LoaderCrashed` when the process died."""
        while True:
            try:
                message, fds = loader.recv()
            except ChannelClosed:
                progress.check_cancelled()
                raise LoaderCrashed(
                    f"The loader process {loader.ended()} while loading {loader.job.model_id}; "
                    "nothing else was affected. Load it again; if it keeps crashing, see the "
                    "server log."
                ) from None
            kind = message.get("type")
            if kind == "ready":
                held = Held.from_json(message["facts"])
                if len(fds) != (1 + held.segments if held.placed.shareable else 0):
                    _close(fds)
                    raise LoaderCrashed(f"the loader sent {len(fds)} fds for its manifest")
                self.arenas.add(loader.job.load_id, held, fds, loader)
                return held
            _close(fds)
            if kind == "progress":
                progress.mirror(message["phase"], message["bytes_done"], message["bytes_total"])
            elif kind == "prepared":
                try:
                    admit(Estimate.from_json(message["estimate"]))
                except BaseException:
                    with suppress(ChannelClosed):
                        loader.send({"type": "stop"})
                    raise
                loader.send({"type": "go"})
            elif kind == "failed":
                raise relayed(message["code"], message["message"], int(message["status"]))

    def close(self) -> None:
        """At shutdown, after every model was let go: the template exits."""
        self.arenas.close()
        self.template.close()

    def discard(self, load_id: str, keep_until: datetime | None = None) -> None:
        """Remove what a load left: its offload folder, its arena fd, its runner (now, or
        at `keep_until` when revoked leases may still read its device segments)."""
        self.arenas.release(load_id, keep_until)
        shutil.rmtree(self.setup.offload_root / load_id, ignore_errors=True)
