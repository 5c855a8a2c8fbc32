"""Prometheus metrics and the Server-Sent Events stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from service.serving.api.deps import require
from service.serving.api.routes.memory import snapshot_of
from service.serving.api.schemas import problem_responses
from service.serving.events import EventBus
from service.serving.registry.states import State

router = APIRouter(tags=["observe"])


@router.get(
    "/metrics",
    dependencies=[require("read")],
    response_class=Response,
    responses=problem_responses(401, 403),
)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    state = request.app.state
    metrics = state.metrics
    metrics.leases.set(len(state.lending.table.active()))
    now = datetime.now(timezone.utc)
    waiting = [
        now - r.queued_at
        for r in state.registry.records()
        if r.state in (State.QUEUED, State.LOADING)
    ]
    metrics.oldest_load_seconds.set(max(waiting).total_seconds() if waiting else 0)
    snapshot = await state.probes.run(lambda: snapshot_of(state))  # off the event loop
    metrics.arena_bytes.set(snapshot.host.shared_arena_bytes)
    metrics.host_total_bytes.set(snapshot.host.total_bytes)
    metrics.host_available_bytes.set(snapshot.host.available_bytes)
    host = snapshot.host
    for gauge, value in (
        (metrics.container_limit_bytes, host.container_limit_bytes),
        (metrics.container_usage_bytes, host.container_usage_bytes),
    ):
        gauge.clear()  # the binding cgroup may change (or stop binding)
        if value is not None:
            gauge.labels(host.container_cgroup or "").set(value)
    for device in snapshot.devices:
        metrics.gpu_total_bytes.labels(device.id).set(device.total_bytes)
        metrics.gpu_used_bytes.labels(device.id).set(device.used_bytes)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/events",
    dependencies=[require("read")],
    response_class=EventSourceResponse,
    responses=problem_responses(401, 403, 422),
)
async def events(
    request: Request,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            pattern=r"^[0-9]{1,18}$",
            description="the id of the last event you got (a number)",
        ),
    ] = None,
) -> EventSourceResponse:
    """Server-Sent Events of model state changes and progress. Reconnect with
    Last-Event-ID to get what you missed (while it is still in the buffer)."""
    bus: EventBus = request.app.state.events
    start = int(last_event_id) if last_event_id is not None else bus.last_id

    async def stream() -> AsyncIterator[dict[str, Any]]:
        async for event in bus.stream(start):
            yield {"id": str(event.id), "event": event.type, "data": json.dumps(event.data)}

    return EventSourceResponse(stream(), ping=15)
