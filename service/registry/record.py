"""One record per held (or loading, or failed) model."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from torch import nn

from service.loading.progress import Progress
from service.loading.spec import LoadRequest
from service.memory.estimate import Estimate
from service.registry.states import State


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class ErrorInfo:
    code: str
    message: str


@dataclass
class ModelRecord:
    id: str
    name: str | None
    spec: LoadRequest
    key: str
    state: State = State.QUEUED
    progress: Progress = field(default_factory=Progress)
    error: ErrorInfo | None = None
    architecture: str | None = None
    task: str | None = None
    dtype: str | None = None
    parameters: int | None = None
    by_device: dict[str, int] = field(default_factory=dict)
    device_map: dict[str, str] | None = None
    resolved_revision: str | None = None
    shareable: bool = False
    shareable_reason: str | None = None
    leases: int = 0
    handle: Any = field(default=None, repr=False)  # handles.descriptor.Handle when shareable
    queued_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    ready_at: datetime | None = None
    last_used_at: datetime = field(default_factory=utcnow)
    progress_notified_at: float = 0.0
    estimate: Estimate | None = field(default=None, repr=False)
    evicted: bool = False
    model: nn.Module | None = field(default=None, repr=False)
    future: Future[None] | None = field(default=None, repr=False)

    @property
    def footprint_bytes(self) -> int:
        return sum(self.by_device.values())

    @property
    def load_seconds(self) -> float | None:
        if self.started_at is None or self.ready_at is None:
            return None
        return (self.ready_at - self.started_at).total_seconds()


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
    }
