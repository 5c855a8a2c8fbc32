"""Inside a loader process: one load (or one estimate), reported over the channel in the
typed messages of `service.common.protocol.messages`.

A load sends `Progressed` messages, then (hub sources, not admitted yet) `Prepared` with
the estimate and waits for `Go`, then `Ready` with the manifest (the held model's facts
and handle) and the arena's fd. A model the service can hold by its fds alone ends the
process there; otherwise the process stays as the model's runner until the service says
`Stop` or closes the channel. Any failure is one `Failed` message with the error's code;
a crash is seen by the service as the channel closing without either.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants

from service.common.estimates import Estimate
from service.common.handles.devices import CUDA
from service.common.load.progress import Phase, Progress
from service.common.protocol.job import Job
from service.common.protocol.messages import (
    TO_LOADER,
    Estimated,
    Failed,
    Go,
    Kind,
    Prepared,
    Progressed,
    Ready,
    Stop,
)
from service.common.protocol.wire import (
    BadMessage,
    Channel,
    ChannelClosed,
    ChannelTimeout,
    close_fds,
)
from service.common.torch_cuda import TorchCuda
from service.loader.arena_placement import ArenaPlacement
from service.loader.heap import unmap_when_freed
from service.loader.pipeline import (
    LoadContext,
    admission_estimate,
    estimate_only,
    load_and_place,
    prepare_admitted,
    translate,
)

log = logging.getLogger("basehold.loader")

_PR_SET_PDEATHSIG = 1
_REPORT_EVERY = 0.05  # seconds between progress messages (phase changes go at once)


def _die_with_parent() -> None:
    """The template is our parent and lives exactly as long as the service: die with it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _setup(job: Job) -> None:
    _die_with_parent()
    # CUDA numbers devices as NVML (and so the serving process) does.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    for key in [key for key in os.environ if key.startswith("HF_")]:
        del os.environ[key]
    os.environ.update(job.hub_env)
    if not job.server_token:  # the request's token or none: never the server's own
        os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
        hub_constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True  # read at import, in the template
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the service, which stops us
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,  # the requesting service's stderr (the template passed it)
        format=f"%(asctime)s %(levelname)s %(name)s [loader {os.getpid()}]: %(message)s",
        force=True,
    )
    torch.set_num_threads(job.threads)
    unmap_when_freed()  # a load's freed temporaries never stay beside its arena
    if job.memory_limit is not None:
        _limit_address_space(job.memory_limit)


def _limit_address_space(extra: int) -> None:
    """RLIMIT_AS: what the template already mapped, plus `extra` for this load."""
    status = Path("/proc/self/status").read_text()
    size = next(
        int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:")
    )
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _context(job: Job) -> LoadContext:
    return LoadContext(
        roots=job.roots,
        offload_root=job.offload_root,
        placement=ArenaPlacement(Path(job.socket), job.segments.build() if job.segments else CUDA),
        cuda=job.cuda.build() if job.cuda else TorchCuda(),
        hub=job.hub,
    )


def _failure(job: Job, exc: BaseException) -> Failed:
    error = translate(exc)
    message = error.message
    if error.code == "internal":
        incident = uuid.uuid4().hex[:12]
        log.error("load of %s failed [incident %s]", job.model_id, incident, exc_info=exc)
        message = f"{message} (incident {incident}; see the server log)"
    return Failed(code=error.code, message=message, status=error.status)


class _Reporter:
    """Progress to the service: phase changes at once, bytes at most every 50 ms."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._sent_at = 0.0
        self._phase: Phase | None = None

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if progress.phase == self._phase and now - self._sent_at < _REPORT_EVERY:
            return
        self._phase, self._sent_at = progress.phase, now
        self._channel.send(
            Progressed(
                phase=progress.phase,
                bytes_done=progress.bytes_done,
                bytes_total=progress.bytes_total,
            )
        )


def _estimate(channel: Channel, job: Job, *, full: bool) -> None:
    """`prepare`: what admission at POST needs (a local checkpoint checked, a hub
    source's metadata; nothing downloaded); `estimate`: the config alone (POST /v1/estimate)."""
    ctx = _context(job)
    try:
        if full:
            result = admission_estimate(job.spec, job.token, ctx)
        else:
            result = estimate_only(job.spec, job.token, ctx)
    except BaseException as exc:
        channel.send(_failure(job, exc))
        return
    channel.send(Estimated(estimate=result.to_json()))


def _load(channel: Channel, job: Job) -> None:
    ctx = _context(job)
    progress = Progress(on_change=_Reporter(channel))

    def admit(estimated: Estimate) -> bool:  # asked before any weight byte is fetched
        channel.send(Prepared(estimate=estimated.to_json()))
        try:
            reply, fds = channel.receive(TO_LOADER, job.stall_seconds)
        except (ChannelTimeout, BadMessage) as exc:  # the service is gone in all but name
            raise ChannelClosed(f"no answer to prepared: {exc}") from None
        close_fds(fds)
        return isinstance(reply, Go)

    try:
        admission = None if job.admitted else admit
        prepared = prepare_admitted(job.spec, job.token, ctx, progress, admission, job.pin)
        if prepared is None:
            return
        loaded = load_and_place(job.model_id, job.load_id, prepared, ctx, progress)
    except ChannelClosed:
        raise
    except BaseException as exc:
        channel.send(_failure(job, exc))
        return
    assert isinstance(ctx.placement, ArenaPlacement)
    shared = ctx.placement.shared(job.load_id)
    held = loaded.facts
    channel.send(Ready(facts=held.manifest()), shared.fds if shared else [])
    if not held.needs_runner:
        return  # the service holds the arena and segments by their fds now
    log.info("holding %s as its runner (%s)", job.model_id, held.placed.reason)
    _run_until_told(channel)
    del loaded


def _run_until_told(channel: Channel) -> None:
    """A runner keeps its model until the service says stop or goes away."""
    while True:
        try:
            message, fds = channel.receive(TO_LOADER)
        except (ChannelClosed, BadMessage):
            return
        close_fds(fds)
        if isinstance(message, Stop):
            return


def main(kind: Kind, sock: socket.socket, job: Job) -> None:
    _setup(job)
    channel = Channel(sock)
    try:
        if kind == "load":
            _load(channel, job)
        else:
            _estimate(channel, job, full=kind == "prepare")
    except ChannelClosed:
        pass  # the service stopped us (an unload, a refusal) or went away
    finally:
        channel.close()
