"""Leases: lend a held model to a training worker as a zero-copy handle."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import RegistryDep, require
from service.api.schemas import LeaseList, LeaseOut, LeaseRequest, problem_responses

router = APIRouter(prefix="/v1", tags=["leases"])


@router.post(
    "/models/{model_id}/leases",
    status_code=201,
    response_model=LeaseOut,
    dependencies=[require("worker")],
    responses=problem_responses(401, 403, 404, 409, 422),
)
async def create_lease(model_id: str, body: LeaseRequest, registry: RegistryDep) -> LeaseOut:
    """Lease a ready model; the handle maps its weights read-only (see service.client)."""
    lease, handle = registry.lease(model_id, body.holder, body.ttl_seconds)
    return LeaseOut.of(lease, handle)  # type: ignore[arg-type]


@router.post(
    "/leases/{lease_id}/renew",
    response_model=LeaseOut,
    dependencies=[require("worker")],
    responses=problem_responses(401, 403, 404),
)
async def renew_lease(lease_id: str, registry: RegistryDep) -> LeaseOut:
    """Push expires_at out by the lease's TTL."""
    return LeaseOut.of(registry.renew_lease(lease_id))


@router.delete(
    "/leases/{lease_id}",
    status_code=204,
    dependencies=[require("worker")],
    responses=problem_responses(401, 403, 404),
)
async def release_lease(lease_id: str, registry: RegistryDep) -> Response:
    """Release a lease (the worker is done with the model)."""
    registry.release_lease(lease_id)
    return Response(status_code=204)


@router.get(
    "/leases",
    response_model=LeaseList,
    dependencies=[require("read")],
    responses=problem_responses(401, 403),
)
async def list_leases(registry: RegistryDep) -> LeaseList:
    """All active leases."""
    return LeaseList(leases=[LeaseOut.of(lease) for lease in registry.leases.active()])
