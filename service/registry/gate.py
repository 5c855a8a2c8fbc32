"""Admission control over the registry's records: estimate vs free memory, LRU-idle victims."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service.errors import InsufficientMemory
from service.memory.admission import Budget, Shortfall, add, free_bytes, shortfalls
from service.memory.cuda import CudaProbe
from service.memory.estimate import Estimate
from service.memory.nvml import GpuProbe
from service.registry.record import ModelRecord
from service.registry.states import State


@dataclass(frozen=True)
class MemoryPolicy:
    budget: Budget
    eviction: str = "none"


class MemoryGate:
    def __init__(self, policy: MemoryPolicy, cuda: CudaProbe, gpus: GpuProbe) -> None:
        self.policy = policy
        self._cuda = cuda
        self.gpus = gpus

    def free(self, records: Iterable[ModelRecord], exclude: str | None = None) -> dict[str, int]:
        records = list(records)
        held = add(r.by_device for r in records if r.state in (State.READY, State.UNLOADING))
        committed = add(
            r.estimate.by_device
            for r in records
            if r.state in (State.QUEUED, State.LOADING)
            and r.estimate is not None
            and r.id != exclude
        )
        return free_bytes(self.policy.budget, self._cuda, self.gpus, held, committed)

    def shortfalls(
        self, estimate: Estimate, records: Iterable[ModelRecord], exclude: str | None = None
    ) -> list[Shortfall]:
        return shortfalls(estimate.by_device, self.free(records, exclude))

    def victim(self, records: Iterable[ModelRecord]) -> ModelRecord | None:
        """Least recently used ready model without leases, if eviction is on."""
        if self.policy.eviction != "lru-idle":
            return None
        idle = [r for r in records if r.state == State.READY and r.leases == 0]
        return min(idle, key=lambda r: r.last_used_at, default=None)


def refuse(model_id: str, short: list[Shortfall]) -> InsufficientMemory:
    where = "; ".join(str(s) for s in short)
    return InsufficientMemory(
        f"{model_id} will not fit ({where}). Unload a model, load it in 4-bit or a smaller "
        "dtype, offload with max_memory, raise BASEHOLD_HOST_MEMORY_BUDGET, or set "
        "BASEHOLD_EVICTION=lru-idle."
    )
