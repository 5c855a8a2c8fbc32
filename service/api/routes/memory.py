"""What memory is used, per device and per model."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Header, Request

from service.api.deps import RegistryDep, require
from service.api.schemas import EstimateOut, MemoryReport, problem_responses
from service.loading.spec import LoadRequest
from service.memory.report import memory_snapshot

router = APIRouter(prefix="/v1", tags=["memory"])


@router.get("/memory", response_model=MemoryReport, dependencies=[require("read")])
async def memory(request: Request, registry: RegistryDep) -> MemoryReport:
    """Per GPU (torch.cuda), host (psutil) and per-model bytes counted from the tensors."""
    models = [(r.id, r.by_device) for r in registry.records() if r.by_device]
    arena = request.app.state.placement.arena_bytes()
    state = request.app.state
    snapshot = memory_snapshot(state.cuda, state.gpus, models, shared_arena_bytes=arena)
    return MemoryReport.model_validate(asdict(snapshot))


@router.post(
    "/estimate",
    response_model=EstimateOut,
    dependencies=[require("read")],
    responses=problem_responses(400, 401, 403, 404, 422),
)
def estimate(
    request: LoadRequest,
    registry: RegistryDep,
    x_hf_token: Annotated[str | None, Header(description="Hub token; never stored")] = None,
) -> EstimateOut:
    """What a load would take per device, from the config on the meta device; nothing is
    loaded (hub sources fetch config.json only)."""
    result, free = registry.estimate(request, x_hf_token)
    fits = all(n <= free.get(d, 0) for d, n in result.by_device.items() if d != "disk")
    return EstimateOut(
        total_bytes=result.total_bytes,
        by_device=result.by_device,
        largest_layer_bytes=result.largest_layer_bytes,
        fits=fits,
        free_bytes=free,
    )
