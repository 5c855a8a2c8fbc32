"""Admission control over the registry's records: estimate vs free memory, LRU-idle victims."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service.common.cuda import CudaProbe
from service.common.errors import InsufficientMemory
from service.common.estimates import Estimate
from service.serving.memory.admission import (
    Budget,
    Measured,
    Shortfall,
    add,
    free_bytes,
    measure,
    shortfalls,
)
from service.serving.memory.cgroup import cgroup_memory
from service.serving.memory.nvml import GpuProbe
from service.serving.memory.visible import listed_once
from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State


@dataclass(frozen=True)
class MemoryPolicy:
    budget: Budget
    eviction: str = "none"


class MemoryGate:
    def __init__(self, policy: MemoryPolicy, cuda: CudaProbe, gpus: GpuProbe) -> None:
        self.policy = policy
        self._cuda = cuda
        self.gpus = gpus

    def measure(self) -> Measured:
        """Probe host and GPU memory (the GPUs listed once). Call it before taking the
        registry's lock."""
        return measure(*listed_once(self._cuda, self.gpus))

    def free(
        self,
        records: Iterable[ModelRecord],
        measured: Measured,
        exclude: str | None = None,
        freed: Iterable[ModelRecord] = (),
    ) -> dict[str, int]:
        """Free bytes per device for a new load, from `measured` (no probe here).
        `exclude`: the load being admitted (its own estimate is not yet committed);
        `freed`: models that would be evicted."""
        records = list(records)
        gone = {id(r) for r in freed}
        held = add(
            r.by_device
            for r in records
            if r.state in (State.READY, State.UNLOADING) and id(r) not in gone
        )
        committed = add(
            r.estimate.by_device
            for r in records
            if r.state in (State.QUEUED, State.LOADING)
            and r.estimate is not None
            and r.id != exclude
        )
        free = free_bytes(self.policy.budget, measured, held, committed)
        budgeted = self.policy.budget.host_budget_bytes is not None
        for device, nbytes in add(r.by_device for r in records if id(r) in gone).items():
            # Measured free memory (host without a budget, GPUs) still counts the victims'
            # bytes as used; a host budget already left them out of `held`.
            if not (device == "cpu" and budgeted):
                free[device] = free.get(device, 0) + nbytes
        return free

    def shortfalls(
        self,
        estimate: Estimate,
        records: Iterable[ModelRecord],
        measured: Measured,
        exclude: str | None = None,
        freed: Iterable[ModelRecord] = (),
    ) -> list[Shortfall]:
        return shortfalls(estimate.by_device, self.free(records, measured, exclude, freed))

    def candidates(self, records: Iterable[ModelRecord]) -> list[ModelRecord]:
        """Ready, unpinned models without leases, least recently used first, if eviction
        is on."""
        if self.policy.eviction != "lru-idle":
            return []
        idle = [
            r for r in records if r.state == State.READY and r.leases == 0 and not r.spec.pinned
        ]
        return sorted(idle, key=lambda r: r.last_used_at)


def refuse(model_id: str, short: list[Shortfall]) -> InsufficientMemory:
    where = "; ".join(str(s) for s in short)
    limit = cgroup_memory() if any(s.device == "cpu" for s in short) else None
    if limit is None:
        return InsufficientMemory(
            f"{model_id} will not fit ({where}). Unload a model, load it in 4-bit or a smaller "
            "dtype, offload with max_memory, raise BASEHOLD_HOST_MEMORY_BUDGET, or set "
            "BASEHOLD_EVICTION=lru-idle."
        )
    return InsufficientMemory(
        f"{model_id} will not fit ({where}); {limit.describe()}. Raise the container's memory "
        "limit, unload a model, load it in 4-bit or a smaller dtype, offload with max_memory, "
        "or set BASEHOLD_EVICTION=lru-idle."
    )
