"""What memory is used, per device and per model."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response
from pydantic import TypeAdapter
from starlette.datastructures import State

from service.common.errors import Forbidden
from service.common.load.spec import LoadRequest
from service.serving.api.deps import HubToken, RegistryDep, ScopesDep, require
from service.serving.api.schemas import (
    EstimateOut,
    MemoryHistoryOut,
    MemoryReport,
    problem_responses,
)
from service.serving.memory.history import HistoryView, MemorySample, leased_bytes, sample_of
from service.serving.memory.report import MemorySnapshot, memory_snapshot

router = APIRouter(prefix="/v1", tags=["memory"])
_HISTORY_JSON = TypeAdapter(HistoryView)


def snapshot_of(state: State) -> MemorySnapshot:
    """What /v1/memory reports (and /metrics exports): the app's registry, arenas and probes."""
    models = [(r.id, r.by_device) for r in state.registry.records() if r.by_device]
    arena = state.placement.arena_bytes()
    return memory_snapshot(state.cuda, state.gpus, models, shared_arena_bytes=arena)


@router.get(
    "/memory",
    response_model=MemoryReport,
    dependencies=[require("read")],
    responses=problem_responses(401, 403),
)
async def memory(request: Request) -> MemoryReport:
    """Per GPU (NVML), host (psutil) and per-model bytes counted from the tensors."""
    state = request.app.state
    snapshot = await state.probes.run(lambda: snapshot_of(state))  # off the event loop
    return MemoryReport.model_validate(asdict(snapshot))


def sample_now(state: State) -> MemorySample:
    """One memory-history sample (blocking: the sampler runs it in a probe thread)."""
    leased = {lease.model_id for lease in state.lending.table.active()}
    held = (r.by_device for r in state.registry.records() if r.id in leased)
    return sample_of(snapshot_of(state), leased_bytes(held))


@router.get(
    "/memory/history",
    response_model=MemoryHistoryOut,
    dependencies=[require("read")],
    responses=problem_responses(401, 403),
)
async def memory_history(request: Request) -> Response:
    """The last hour of memory samples (host, container, GPUs; held, lendable and
    leased bytes), oldest first: a dashboard opened now draws the minutes before it."""
    view = request.app.state.history.view()
    # Straight from the dataclasses to JSON: an hour of samples over 8 GPUs is ~3 ms
    # this way, ~150 ms through asdict and the response model, on the event loop.
    return Response(_HISTORY_JSON.dump_json(view), media_type="application/json")


@router.post(
    "/estimate",
    response_model=EstimateOut,
    dependencies=[require("read")],
    responses=problem_responses(400, 401, 403, 404, 413, 422, 429, 502, 503, 504),
)
def estimate(
    request: LoadRequest,
    http: Request,
    registry: RegistryDep,
    scopes: ScopesDep,
    x_hf_token: HubToken = None,
) -> EstimateOut:
    """What a load would take per device, from the config on the meta device; nothing is
    loaded (hub sources fetch config.json only). With `trust_remote_code` the config's own
    code runs, so that needs an admin key. A hub source is fetched with the request's
    X-HF-Token only: the server's own token (HF_TOKEN) serves admin keys alone, so a read
    key cannot reach what only the server's token may see."""
    if request.trust_remote_code and "admin" not in scopes:
        raise Forbidden(
            "Estimating with trust_remote_code runs the checkpoint's code: that needs an admin "
            "key. Drop trust_remote_code or ask the operator."
        )
    with http.app.state.estimate_slots.slot():
        result, free = registry.estimate(request, x_hf_token, server_token="admin" in scopes)
    fits = all(n <= free.get(d, 0) for d, n in result.by_device.items() if d != "disk")
    return EstimateOut(
        total_bytes=result.total_bytes,
        by_device=result.by_device,
        largest_layer_bytes=result.largest_layer_bytes,
        fits=fits,
        free_bytes=free,
        download_bytes=result.download.bytes if result.download is not None else 0,
    )
