"""create_app(settings): the one place the service is wired together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi_offline import FastAPIOffline

from service import __version__
from service.common.cores import LoadParallelism, usable_cores
from service.common.cuda import CudaProbe
from service.common.load.sources import HubOptions
from service.serving.api import openapi, problems
from service.serving.api.guards import RequestGuards
from service.serving.api.probes import Probes
from service.serving.api.routes import dashboard, files, health, leases, memory, models, observe
from service.serving.api.security_headers import SecurityHeaders
from service.serving.api.slots import Slots
from service.serving.api.timing import RequestMetrics
from service.serving.api.write_gate import GateMiddleware, WriteGate
from service.serving.events import EventBus
from service.serving.handover.giver import Giver, Parts
from service.serving.handover.kept import KeeperLink
from service.serving.handover.messages import SOCKET_NAME
from service.serving.handover.taker import Handed
from service.serving.leases.leases import LeaseTable
from service.serving.leases.lending import Lending
from service.serving.loaders.arenas import HeldArenas
from service.serving.loaders.loaders import Loaders, LoaderSetup
from service.serving.memory.history import MemoryHistory
from service.serving.memory.nvml import GpuProbe, Nvml
from service.serving.memory.visible import NvmlCuda
from service.serving.metrics import Metrics
from service.serving.node_features import NodeFeatures
from service.serving.preload import Preload
from service.serving.registry.gate import MemoryGate, MemoryPolicy
from service.serving.registry.record import ModelRecord, summary
from service.serving.registry.registry import Registry
from service.serving.registry.states import State
from service.serving.settings import Settings
from service.serving.socket.server import ArenaServer, resolve_group
from service.serving.state.lock import StateLock
from service.serving.state.snapshots import FOLDER as SNAPSHOTS
from service.serving.state.snapshots import Snapshots
from service.serving.state.startup import follow_predecessor, start_state
from service.serving.state.writer import OrderedWriter

log = logging.getLogger("basehold")


async def _reap_leases(
    lending: Lending, placement: HeldArenas, every: float, metrics: Metrics, gate: WriteGate
) -> None:
    """Drop unrenewed leases; free device segments that revoked leases no longer need.
    A pass that fails (a locked database, a GPU error) is logged and the next one runs:
    the reaper is what keeps dead workers from pinning memory, so it never stops. While
    the service hands over (renewals wait), no lease expires."""

    def expire() -> None:  # a DB write
        if not gate.closed:
            metrics.leases_expired.inc(len(lending.expire()))

    while True:
        await asyncio.sleep(every)
        for step in (expire, placement.collect):
            try:
                await asyncio.to_thread(step)
            except RuntimeError as exc:
                if "after shutdown" in str(exc):  # the interpreter exits under a live app
                    return
                log.exception("lease reaper: %s failed; retrying next pass", step.__name__)
            except Exception:
                log.exception("lease reaper: %s failed; retrying next pass", step.__name__)


def _shutdown_steps(*steps: tuple[str, Callable[[], object]]) -> None:
    """Run every step of a shutdown even if one fails (each failure is logged)."""
    for name, step in steps:
        try:
            step()
        except Exception:
            log.exception("shutdown: %s failed; going on with the rest", name)


def _resync(registry: Registry, table: LeaseTable) -> None:
    """A handover that did not happen: the models and leases written as they are now."""
    registry.rewrite_all()
    table.rewrite_all()


SETTLE_SECONDS = 0.1  # after a takeover: starts that serve no request, this much later


def _run_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


def _served_handed(models: int, handed: Handed) -> None:
    log.info(
        "serving %d model(s) handed over by pid %d, %.0f ms after its offer",
        models,
        handed.pid,
        (time.monotonic() - handed.received) * 1000,
    )


def _after_handover(settings: Settings, http_passed: bool, keeper: KeeperLink | None) -> None:
    """Stop serving (SIGTERM: uvicorn drains and exits, the state untouched), unless the
    successor serves another listener and this one should wait to be stopped."""
    if keeper is not None:
        keeper.handed_over()
    if http_passed or settings.after_handover == "exit":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        log.info("handed over: answering 503 handed_over until stopped (BASEHOLD_AFTER_HANDOVER)")


def create_app(
    settings: Settings | None = None,
    *,
    cuda: CudaProbe | None = None,
    gpus: GpuProbe | None = None,
    segments: object | None = None,
    lock: StateLock | None = None,
    history: MemoryHistory | None = None,
    keeper: KeeperLink | None = None,
) -> FastAPI:
    """`cuda`, `gpus` and `segments` are the seams to GPU hardware (tests without one
        pass fakes; `segments` travels to loader processes); the defaults ask torch (in the
        loaders), NVML and CUDA IPC. `lock`: the state directory's
        lock if the caller took it already (the CLI does, to refuse with a clear line);
        otherwise startup takes it. `history`: the memory samples' ring buffer (default: one
        every 5 s for an hour; tests sample faster). `keeper`: the link to the keeper process
    that started this one (`serve --keeper`): told each model held and let go."""
    settings = settings or Settings()
    settings.ensure_dirs()
    lock = lock or StateLock(settings.state_dir)
    gpus = gpus or Nvml()
    probe = cuda or NvmlCuda(gpus)  # the serving process never initialises CUDA
    parallelism = LoadParallelism.of(
        usable_cores(), settings.max_concurrent_loads, settings.torch_threads
    )
    loaders = Loaders(
        LoaderSetup(
            roots=settings.model_roots,
            offload_root=settings.offload_dir,
            socket=settings.socket,
            cuda=cuda,  # None: loaders ask torch
            hub=HubOptions(
                endpoint=settings.hf_endpoint,
                retries=settings.download_retries,
                backoff=settings.download_backoff_seconds,
                workers=settings.download_workers,
            ),
            segments=segments,
            threads=parallelism.threads,
            template=settings.loader_template,
            memory_limit=settings.loader_memory_limit,
            stall_seconds=settings.loader_stall_seconds,
        )
    )
    placement = loaders.arenas
    snapshots = None
    if settings.snapshots:
        snapshots = Snapshots(settings.state_dir / SNAPSHOTS, placement.dup_fds)
    gate = MemoryGate(MemoryPolicy(settings.budget, settings.eviction), probe, gpus)
    writer = OrderedWriter()  # one ordered writer for the registry and the leases
    table = LeaseTable(settings.segment_grace_seconds, writer)
    registry = Registry(
        loaders,
        probe,
        gate,
        table,
        max_concurrent_loads=parallelism.loads,
        allow_remote_code=settings.allow_remote_code,
        writer=writer,
        snapshots=snapshots,
    )
    lending = Lending(
        registry,
        table,
        placement,
        settings.max_leases_per_model,
        settings.max_leases_per_holder,
    )
    arenas = ArenaServer(
        settings.socket, lending.arena_fds, group=resolve_group(settings.socket_group)
    )

    events = EventBus()
    writes = WriteGate()
    metrics = Metrics()
    probes = Probes()  # NVML and psutil, off the event loop
    history = history or MemoryHistory(every=settings.memory_history_seconds)

    def publish(record: ModelRecord, previous: State, target: State) -> None:
        kind = "progress" if previous == target else "state"
        events.publish(kind, {**summary(record), "previous": previous.value})

    if snapshots is not None:
        registry.subscribe(snapshots.on_transition)
    if keeper is not None:  # first: it hears models adopted at restore too
        keeper.placement = loaders
        registry.subscribe(keeper.on_transition)
    registry.subscribe(metrics.on_transition)
    registry.subscribe(publish)
    features = None
    if settings.node_features_file is not None:
        features = NodeFeatures(settings.node_features_file, writer)
        registry.subscribe(features.on_transition)

    preload = Preload(settings.preload) if settings.preload is not None else None

    def _preload_once_warm(preload: Preload, warming: threading.Thread) -> None:
        warming.join()  # its estimates run in the template's helpers
        preload.run(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.auth_enabled:
            log.warning(
                "no API keys configured (BASEHOLD_API_KEYS): every request is "
                "trusted; serve on 127.0.0.1 only"
            )
        # The loader template imports torch and friends in its own process, from now on:
        # /healthz answers at once, /readyz once the template forks.
        # A successor starts it once it holds what it was handed (starting it before
        # slows the takeover down on a busy machine).
        warming = threading.Thread(target=loaders.warm, name="loader-template", daemon=True)
        handed: Handed | None = getattr(app.state, "handed", None)
        if handed is None:
            warming.start()
        # Everything imported so far lives for the whole process: keep it out of the
        # cyclic GC's full passes (a successor collected before it took over: ~50 ms that
        # clients of the listener it takes would wait for).
        if handed is None:
            gc.collect()
        gc.freeze()
        if handed is None:
            lock.acquire()  # the CLI took it already: a no-op there
        events.bind(asyncio.get_running_loop())
        handed_models = len(handed.models) if handed is not None else 0
        db = await run_in_threadpool(
            start_state, settings, lock, registry, table, handed, snapshots
        )
        arenas.start(handed.worker if handed is not None else None)
        if keeper is not None:
            keeper.listeners(getattr(app.state, "http_listener", None), arenas.dup_listener())
        giver = Giver(
            settings.state_dir / SOCKET_NAME,
            Parts(
                gate=writes,
                registry=registry,
                placement=loaders,
                flush=writer.flush,
                resync=lambda: _resync(registry, table),
                worker_socket=arenas,
                lock=lock,
                http=getattr(app.state, "http_listener", None),
                load_wait=settings.handover_load_wait_seconds,
                after=lambda passed: _after_handover(settings, passed, keeper),
            ),
        )
        giver.db = db
        giver.listen()  # a next successor queues from now on; answered once it starts
        app.state.giver = giver
        # A start: what it restores, held again from a snapshot already or not; a successor:
        # what it still loads (the rest was handed over).
        restoring = registry.restoring()
        if handed is None:
            restoring = sum(
                1 for r in registry.records() if r.restored_at and r.state != State.FAILED
            )
        if restoring:
            events.publish("restore", {"restoring": restoring, "leases": len(table.active())})
        every = settings.lease_reap_seconds
        reaper = asyncio.create_task(_reap_leases(lending, placement, every, metrics, writes))
        # /v1/memory/history: sampled in the probe threads, kept on the loop.
        sampler = asyncio.create_task(
            history.run(lambda: probes.run(lambda: memory.sample_now(app.state)))
        )
        if features is not None:
            await run_in_threadpool(features.start)
        preloading: list[Callable[[], None]] = []
        if preload is not None:  # once started and restored: a restored model is found
            preloading.append(
                threading.Thread(
                    target=_preload_once_warm, args=(preload, warming), name="preload", daemon=True
                ).start
            )
        app.state.ready = True
        settling: asyncio.TimerHandle | None = None
        if handed is None:
            _run_all([giver.start, *preloading])
        else:
            # What serves no request waits until the clients that queued on the listener
            # during the takeover are answered: thread starts are not free on a busy machine.
            later = [
                giver.start,
                lambda: follow_predecessor(settings, lock, registry),
                warming.start,
                *preloading,
            ]
            app.state.when_serving.append(lambda: _served_handed(handed_models, handed))
            settling = asyncio.get_running_loop().call_later(SETTLE_SECONDS, _run_all, later)
        try:
            yield
        finally:
            app.state.ready = False
            if settling is not None:  # stopped before those started: they never do
                settling.cancel()
            for task in (reaper, sampler):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            giver.stop()
            await run_in_threadpool(giver.let_go)  # handed over: the last request answered
            if giver.handed_to is None:  # else the successor holds it all: nothing to undo
                log.info("shutting down: cancelling loads and unloading models")
                labels = [("remove the node features file", features.stop)] if features else []
                if snapshots is not None:  # the unloads below keep them, as the database's rows
                    labels.append(("stop writing snapshots", snapshots.stop))
                await run_in_threadpool(
                    _shutdown_steps,
                    *labels,
                    ("write what is queued", writer.flush),
                    ("freeze the state database", db.freeze),  # what the next start restores
                    ("stop the worker socket", arenas.stop),
                    ("unload models", registry.shutdown),
                    ("close the state database", db.close),
                    ("release the state lock", lock.release),
                )
            probes.close()

    # Swagger UI and ReDoc from fastapi-offline's bundled assets: an air-gapped GPU node
    # shows /docs without reaching a CDN.
    app = FastAPIOffline(
        title="basehold",
        version=__version__,
        summary="Load and hold Hugging Face base models; lend them to PEFT training workers.",
        lifespan=lifespan,
        static_url="/static/docs",
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.estimate_slots = Slots(
        "estimates", settings.max_concurrent_estimates, settings.max_concurrent_estimates, 10.0
    )
    app.state.lending = lending
    app.state.placement = placement
    app.state.arenas = arenas
    app.state.loaders = loaders
    app.state.preload = preload
    app.state.cuda = probe
    app.state.gpus = gate.gpus
    app.state.probes = probes
    app.state.history = history
    app.state.events = events
    app.state.metrics = metrics
    app.state.ready = False
    app.state.when_serving = []  # called once the server serves (by `basehold serve`)
    app.state.writes = writes
    app.state.keeper = keeper
    problems.install(app)
    openapi.install(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(leases.router)
    app.include_router(files.router)
    app.include_router(memory.router)
    app.include_router(observe.router)
    app.include_router(dashboard.router)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(GateMiddleware, gate=writes)
    # Outermost: before routing, auth and body parsing.
    app.add_middleware(
        RequestGuards,
        max_body_bytes=settings.max_body_bytes,
        check_host=not settings.auth_enabled,
        allowed_hosts=settings.allowed_hosts,
    )
    return app
