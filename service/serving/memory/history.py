"""The last hour of memory samples, kept by the serving process for the dashboard.

A ring buffer (bounded: `span / every` samples) filled by one asyncio task that takes a
sample every `every` seconds. The sample itself is blocking (NVML, psutil): the task hands
it to the probe threads and only appends on the event loop, so the buffer is touched from
the loop alone and needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from service.serving.memory.report import MemorySnapshot

log = logging.getLogger("basehold")


@dataclass(frozen=True)
class HostSample:
    used_bytes: int  # the node's: total less available
    total_bytes: int
    held_bytes: int  # by models, in host memory
    arena_bytes: int  # in shared arenas: lendable to workers
    leased_bytes: int  # of the held bytes, those of models with an active lease
    container_limit_bytes: int | None
    container_usage_bytes: int | None


@dataclass(frozen=True)
class DeviceSample:
    id: str
    used_bytes: int  # NVML: every process on the GPU
    held_bytes: int
    leased_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class MemorySample:
    at: datetime
    host: HostSample
    devices: tuple[DeviceSample, ...]


@dataclass(frozen=True)
class HistoryView:
    """What GET /v1/memory/history answers (its schema: MemoryHistoryOut)."""

    interval_seconds: float
    span_seconds: float
    samples: list[MemorySample]  # oldest first


def sample_of(
    snapshot: MemorySnapshot, leased: dict[str, int], at: datetime | None = None
) -> MemorySample:
    """One sample from a /v1/memory snapshot; `leased`: bytes per device of leased models."""
    host = snapshot.host
    return MemorySample(
        at=at or datetime.now(UTC),
        host=HostSample(
            used_bytes=host.total_bytes - host.available_bytes,
            total_bytes=host.total_bytes,
            held_bytes=host.held_bytes,
            arena_bytes=host.shared_arena_bytes,
            leased_bytes=leased.get("cpu", 0),
            container_limit_bytes=host.container_limit_bytes,
            container_usage_bytes=host.container_usage_bytes,
        ),
        devices=tuple(
            DeviceSample(
                id=d.id,
                used_bytes=d.used_bytes,
                held_bytes=d.held_bytes,
                leased_bytes=leased.get(d.id, 0),
                total_bytes=d.total_bytes,
            )
            for d in snapshot.devices
        ),
    )


def leased_bytes(models: Iterable[dict[str, int]]) -> dict[str, int]:
    """Bytes per device over the `by_device` of the models that are leased now."""
    total: dict[str, int] = {}
    for by_device in models:
        for device, nbytes in by_device.items():
            total[device] = total.get(device, 0) + nbytes
    return total


class MemoryHistory:
    def __init__(self, every: float = 5.0, span: float = 3600.0) -> None:
        if every <= 0 or span < every:
            raise ValueError(f"memory history: every={every} s must be > 0 and <= span={span} s")
        self.every = every
        self.span = span
        self._samples: deque[MemorySample] = deque(maxlen=math.ceil(span / every))

    @property
    def capacity(self) -> int:
        return self._samples.maxlen or 0

    def add(self, sample: MemorySample) -> None:
        self._samples.append(sample)  # the oldest falls out once full

    def samples(self) -> list[MemorySample]:
        """Oldest first."""
        return list(self._samples)

    def view(self) -> HistoryView:
        return HistoryView(self.every, self.span, self.samples())

    async def run(self, take: Callable[[], Awaitable[MemorySample]]) -> None:
        """Sample now and every `every` seconds until cancelled (at shutdown). A failed
        sample (a driver error) is logged and the next one is taken: a gap in the chart,
        not a dead sampler."""
        while True:
            try:
                self.add(await take())
            except Exception:
                log.exception("memory history: a sample failed; taking the next one")
            await asyncio.sleep(self.every)
