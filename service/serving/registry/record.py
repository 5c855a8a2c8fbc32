"""One record per held (or loading, or failed) model."""

from __future__ import annotations

import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone

from service.common.estimates import Estimate
from service.common.load.progress import Progress
from service.common.load.spec import LoadRequest
from service.common.protocol.held import Held, Manifest
from service.serving.registry.backend import RunningLoad
from service.serving.registry.states import State


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class ErrorInfo:
    code: str
    message: str


@dataclass
class Adopted:
    """A model a predecessor handed over: its load's id, manifest and fds (the arena's,
    then its device segments'; or its runner's, see `Loaders.handover_fds`)."""

    load_id: str
    facts: Manifest
    fds: list[int]
    started_at: datetime | None
    ready_at: datetime | None
    runner: int | None = None  # the pid of the runner that holds it


def new_load_id(model_id: str) -> str:
    """Unique per load attempt: what a load leaves behind (offload folder, placement) is
    keyed by it, so cleaning up one load never touches another of the same model id."""
    return f"{model_id}.{uuid.uuid4().hex[:8]}"


@dataclass
class ModelRecord:
    id: str
    name: str | None
    spec: LoadRequest
    key: str
    load_id: str = ""
    state: State = State.QUEUED
    progress: Progress = field(default_factory=Progress)
    error: ErrorInfo | None = None
    # Local sources are admitted at submit; hub sources when their loader asks.
    admitted: bool = False
    estimate: Estimate | None = field(default=None, repr=False)
    loaded: Held | None = field(default=None, repr=False)
    loader: RunningLoad | None = field(default=None, repr=False)  # the load's (or runner's)
    leases: int = 0
    queued_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    ready_at: datetime | None = None
    restored_at: datetime | None = None
    last_used_at: datetime = field(default_factory=utcnow)
    progress_notified_at: float = 0.0
    evicted: bool = False
    future: Future[None] | None = field(default=None, repr=False)
    # Other names it answers to: the names of POSTs of its spec after it was held.
    aliases: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.load_id:
            self.load_id = new_load_id(self.id)

    @property
    def by_device(self) -> dict[str, int]:
        return dict(self.loaded.by_device) if self.loaded is not None else {}

    @property
    def footprint_bytes(self) -> int:
        return sum(self.by_device.values())

    @property
    def shareable(self) -> bool:
        return self.loaded is not None and self.loaded.placed.shareable

    @property
    def load_seconds(self) -> float | None:
        if self.started_at is None or self.ready_at is None:
            return None
        return (self.ready_at - self.started_at).total_seconds()

    @property
    def restoring(self) -> bool:
        """Restored after a restart and not settled yet (ready or failed)."""
        return self.restored_at is not None and self.state in (State.QUEUED, State.LOADING)


def summary(record: ModelRecord) -> dict[str, object]:
    """The compact form events carry."""
    progress = record.progress
    return {
        "id": record.id,
        "state": record.state.value,
        "progress": {
            "phase": progress.phase.value,
            "bytes_done": progress.bytes_done,
            "bytes_total": progress.bytes_total,
        },
        "error": {"code": record.error.code, "message": record.error.message}
        if record.error
        else None,
        "footprint_bytes": record.footprint_bytes,
        "leases": record.leases,
        "evicted": record.evicted,
        "restored": record.restored_at is not None,
    }
