"""One load from request to held model, as steps the registry drives:
`prepare` (resolve, check; priced where admission asks) → `load_and_place`.
Nothing here calls back into the registry. Runs in a loader process."""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from service.common.cuda import CudaProbe
from service.common.errors import (
    BaseholdError,
    InvalidCheckpoint,
    InvalidSpec,
    OutOfMemory,
    RemoteCodeRefused,
)
from service.common.estimates import Estimate
from service.common.load.pin import HubPin
from service.common.load.progress import Phase, Progress
from service.common.load.sources import (
    HubOptions,
    HubSource,
    LocalSource,
    hub_cache_dir,
    parse_source,
    provenance_of,
)
from service.common.load.spec import LoadRequest, Task
from service.common.protocol.held import Held
from service.common.torch_cuda import TorchCuda
from service.loader import direct, hub
from service.loader.ahead import Ahead
from service.loader.cast_arena import CastArena
from service.loader.checkpoint import (
    CheckpointInfo,
    confine_folder,
    inspect_checkpoint,
    require_config,
)
from service.loader.direct import Prefetch
from service.loader.estimate import estimate
from service.loader.footprint import bytes_by_device, count_parameters, device_map_of
from service.loader.placement import Placement
from service.loader.strategies.registry import get_loader
from service.loader.tasks import resolve_task
from service.loader.weights_bar import tracking

log = logging.getLogger("basehold.loading")


@dataclass(frozen=True)
class LoadContext:
    roots: list[Path]
    offload_root: Path
    placement: Placement
    cuda: CudaProbe = field(default_factory=TorchCuda)  # the seam to GPUs (estimates)
    hub: HubOptions = field(default_factory=HubOptions)


class Stage(Enum):
    """How far `resolve` goes for a hub source."""

    CONFIG = "config"  # config.json only (POST /v1/estimate)
    ADMIT = "admit"  # + the safetensors headers: admission, nothing downloaded
    FULL = "full"  # the snapshot downloaded (the load)


@dataclass(frozen=True)
class Resolved:
    path: Path
    revision: str | None
    config: PretrainedConfig
    task: Task
    # Where every file the load reads must resolve: the model roots, or the hub cache.
    allowed: tuple[Path, ...]
    plan: hub.Plan | None = None  # hub sources: the commit and its files


@dataclass(frozen=True)
class Prepared:
    """Everything known before any weight is read: where the checkpoint is and what it
    is. (What it will take is priced only where admission asks: `_priced`.)"""

    spec: LoadRequest
    resolved: Resolved
    checkpoint: CheckpointInfo


@dataclass
class LoadedModel:
    """In the loader: the model, and the facts its manifest carries to the service."""

    model: nn.Module
    facts: Held


def resolve(
    spec: LoadRequest,
    token: str | None,
    ctx: LoadContext,
    *,
    stage: Stage = Stage.FULL,
    progress: Progress | None = None,
    plan: hub.Plan | None = None,
    pin: HubPin | None = None,
) -> Resolved:
    """Find the checkpoint and decide the task. Hub sources: the revision resolved to a
    commit and the file list first (no file bytes; `plan` when that was done already in
    this process, `pin` when admission did it in another), then as far as `stage` says."""
    source = parse_source(spec.source, spec.revision, ctx.roots)
    revision: str | None = None
    if isinstance(source, HubSource):
        allowed: tuple[Path, ...] = (Path(hub_cache_dir()).resolve(),)
        if plan is None:
            plan = hub.Plan.from_pin(source, pin) if pin else hub.plan(source, token, ctx.hub)
        revision = plan.commit
        if stage is Stage.FULL:
            hub.check_disk(plan)
            path = hub.download(plan, token, ctx.hub, progress or Progress())
        else:
            path = hub.fetch_config(plan, token, ctx.hub)
            if stage is Stage.ADMIT:  # the disk: the registry, with the downloads in flight
                hub.check_weights(plan, token, ctx.hub)
    else:
        assert isinstance(source, LocalSource)
        allowed = tuple(ctx.roots)
        path = source.path
        require_config(path)
    confine_folder(path, allowed)
    config = _load_config(path, spec)
    task = resolve_task(spec.task, config)
    _prepare_config(config, spec, task)
    return Resolved(path, revision, config, task, allowed, plan)


def _priced(spec: LoadRequest, resolved: Resolved, ctx: LoadContext) -> Estimate:
    """What the load takes in memory, and for a hub source what it writes to disk first."""
    priced = estimate(spec, resolved.config, resolved.task, ctx.cuda)
    if resolved.plan is None:
        return priced
    return replace(priced, download=resolved.plan.download(), pin=resolved.plan.pin())


def estimate_only(spec: LoadRequest, token: str | None, ctx: LoadContext) -> Estimate:
    """POST /v1/estimate: the config alone (hub sources fetch config.json only)."""
    return _priced(spec, resolve(spec, token, ctx, stage=Stage.CONFIG), ctx)


def admission_estimate(spec: LoadRequest, token: str | None, ctx: LoadContext) -> Estimate:
    """What admission needs before a load reads weights: a local checkpoint checked in
    full; a hub source from its metadata (config, safetensors headers, the cache's free
    disk), with no weight byte downloaded."""
    if spec.source.startswith("/"):
        return _priced(spec, prepare(spec, token, ctx).resolved, ctx)
    return _priced(spec, resolve(spec, token, ctx, stage=Stage.ADMIT), ctx)


def prepare(
    spec: LoadRequest,
    token: str | None,
    ctx: LoadContext,
    progress: Progress | None = None,
    plan: hub.Plan | None = None,
    pin: HubPin | None = None,
) -> Prepared:
    """Resolve (download hub snapshots) and check the checkpoint's files."""
    if progress is not None:
        progress.set_phase(Phase.RESOLVING)
    resolved = resolve(spec, token, ctx, progress=progress, plan=plan, pin=pin)
    checkpoint = inspect_checkpoint(resolved.path, resolved.allowed)
    return Prepared(spec, resolved, checkpoint)


Admit = Callable[[Estimate], bool]  # asked before weights are read; False: stop the load


def prepare_admitted(
    spec: LoadRequest,
    token: str | None,
    ctx: LoadContext,
    progress: Progress,
    admit: Admit | None,
    pin: HubPin | None = None,
) -> Prepared | None:
    """`prepare`, with `admit` (when given) asked before any weight byte is downloaded or
    read: a hub source from its metadata, a local one once its files are checked. None
    when it says no. Admitted already (`admit` None): a hub source downloads the snapshot
    admission priced (`pin`), resolving nothing again."""
    if admit is None:
        return prepare(spec, token, ctx, progress, pin=pin)
    if spec.source.startswith("/"):
        prepared = prepare(spec, token, ctx, progress)
        return prepared if admit(_priced(spec, prepared.resolved, ctx)) else None
    progress.set_phase(Phase.RESOLVING)
    metadata = resolve(spec, token, ctx, stage=Stage.ADMIT)
    if not admit(_priced(spec, metadata, ctx)):
        return None
    return prepare(spec, token, ctx, progress, metadata.plan)  # the same commit and files


def _load_config(path: Path, spec: LoadRequest) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=spec.trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise RemoteCodeRefused(
                "This checkpoint needs its own Python code (auto_map). Loading it requires "
                "`trust_remote_code: true` and a server started with BASEHOLD_ALLOW_REMOTE_CODE."
            ) from exc
        raise InvalidCheckpoint(f"config.json cannot be read: {exc}") from exc
    except OSError as exc:
        raise InvalidCheckpoint(f"config.json cannot be read: {exc}") from exc


def _prepare_config(config: PretrainedConfig, spec: LoadRequest, task: Task) -> None:
    if spec.num_labels is not None:
        if task not in (Task.SEQ_CLS, Task.TOKEN_CLS):
            raise InvalidSpec(f"num_labels applies to seq-cls and token-cls, not {task.value}.")
        config.num_labels = spec.num_labels


def _is_enomem(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    # torch's CPU allocator raises RuntimeError("... DefaultCPUAllocator: can't allocate memory")
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def translate(exc: BaseException) -> BaseholdError:
    """Map whatever a load raised to a domain error with a stable code."""
    if isinstance(exc, BaseholdError):
        return exc
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or _is_enomem(exc):
        return OutOfMemory(
            "The node ran out of memory while loading; everything was released. Try a "
            "smaller dtype, 4-bit quantization, or offload with max_memory."
        )
    if isinstance(exc, (SafetensorError, EOFError)) or (
        isinstance(exc, OSError) and not isinstance(exc, PermissionError)
    ):
        return InvalidCheckpoint(f"The weights could not be read ({exc}). Re-download or re-save.")
    if isinstance(exc, ValueError) and "offload" in str(exc):
        return InvalidSpec(f"{exc} Set `offload: true` or give more max_memory.")
    return BaseholdError(f"{type(exc).__name__}: {exc}")


def _prefetch(load_id: str, prepared: Prepared, ctx: LoadContext) -> Ahead | None:
    """The arena written while transformers loads, where the load keeps the files' tensors
    as they are (their bytes copied: `service.loader.direct`) or casts them (the casts
    write into it: `service.loader.cast_arena`). Only a speed-up: a failure to start it is
    logged and the load goes on without it."""
    spec, resolved = prepared.spec, prepared.resolved
    files = prepared.checkpoint.weight_files
    if not ctx.placement.takes_prefetch:
        return None
    try:
        if not direct.host_plain(spec, resolved.config, files, ctx.cuda):
            return None
        if direct.applies(spec, resolved.config, resolved.task, files, ctx.cuda):
            prefetch = Prefetch.start(load_id, spec, resolved.config, files)
            if prefetch is not None:
                return prefetch
        return CastArena.start(load_id, files)
    except Exception:
        log.warning(
            "writing %s into its arena ahead failed; loading without", load_id, exc_info=True
        )
        return None


def load_and_place(
    model_id: str, load_id: str, prepared: Prepared, ctx: LoadContext, progress: Progress
) -> LoadedModel:
    """Load the weights and place them (shared arena or private memory). `load_id` is
    unique per load: offload folders and placements are keyed by it, so the cleanup of a
    cancelled load can never touch a newer load of the same model id."""
    spec, resolved = prepared.spec, prepared.resolved
    progress.set_total(prepared.checkpoint.bytes_total)
    progress.check_cancelled()
    loader = get_loader(spec)
    offload = ctx.offload_root / load_id if spec.offload else None
    progress.set_phase(loader.phase)
    prefetch = _prefetch(load_id, prepared, ctx)
    try:
        with tracking(progress, prepared.checkpoint.tensor_bytes), _within(prefetch):
            model = loader.load(spec, resolved.path, resolved.task, resolved.config, offload)
        progress.set_phase(Phase.SHARING)
        provenance = provenance_of(spec.source, resolved.revision, spec.base_model)
        files = prepared.checkpoint.weight_files
        placed = ctx.placement.place(model_id, load_id, model, files, provenance, prefetch)
        progress.check_cancelled()
    except BaseException:
        discard(load_id, ctx)
        raise
    finally:
        if prefetch is not None:
            prefetch.close()
    facts = Held(
        task=resolved.task,
        architecture=type(model).__name__,
        dtype=str(getattr(model, "dtype", "")).removeprefix("torch."),
        parameters=count_parameters(model),
        resolved_revision=resolved.revision,
        by_device=bytes_by_device(model),
        device_map=device_map_of(model),
        placed=placed,
        checkpoint=resolved.path,
        allowed=resolved.allowed,
    )
    return LoadedModel(model, facts)


def _within(ahead: Ahead | None) -> AbstractContextManager[None]:
    return nullcontext() if ahead is None else ahead.loading()


def discard(load_id: str, ctx: LoadContext, keep_until: datetime | None = None) -> None:
    """Remove what a load left on disk (offload folder) and its placement; memory is freed
    by the caller. `keep_until`: revoked leases may read device memory until then."""
    shutil.rmtree(ctx.offload_root / load_id, ignore_errors=True)
    ctx.placement.release(load_id, keep_until)
