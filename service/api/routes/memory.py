"""What memory is used, per device and per model."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request

from service.api.deps import RegistryDep, require
from service.api.schemas import MemoryReport
from service.memory.report import memory_snapshot

router = APIRouter(prefix="/v1", tags=["memory"])


@router.get("/memory", response_model=MemoryReport, dependencies=[require("read")])
def memory(request: Request, registry: RegistryDep) -> MemoryReport:
    """Per GPU (torch.cuda), host (psutil) and per-model bytes counted from the tensors."""
    models = [(r.id, r.by_device) for r in registry.records() if r.by_device]
    arena = request.app.state.placement.arena_bytes()
    snapshot = memory_snapshot(request.app.state.cuda, models, shared_arena_bytes=arena)
    return MemoryReport.model_validate(asdict(snapshot))
