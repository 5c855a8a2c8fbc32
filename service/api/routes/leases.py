"""Leases: lend a held model to a training worker as a zero-copy handle.

The routes are plain `def` (run in the threadpool): granting, renewing and releasing write
the state database, which never happens on the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import LendingDep, require
from service.api.schemas import LeaseList, LeaseOut, LeaseRequest, problem_responses

router = APIRouter(prefix="/v1", tags=["leases"])


@router.post(
    "/models/{model_id}/leases",
    status_code=201,
    response_model=LeaseOut,
    dependencies=[require("worker")],
    responses=problem_responses(401, 403, 404, 409, 422),
)
def create_lease(model_id: str, body: LeaseRequest, lending: LendingDep) -> LeaseOut:
    """Lease a ready model; the handle maps its weights read-only (see service.client)."""
    lease, handle = lending.grant(model_id, body.holder, body.ttl_seconds)
    return LeaseOut.of(lease, handle)


@router.post(
    "/leases/{lease_id}/renew",
    response_model=LeaseOut,
    dependencies=[require("worker")],
    responses=problem_responses(401, 403, 404),
)
def renew_lease(lease_id: str, lending: LendingDep) -> LeaseOut:
    """Push expires_at out by the lease's TTL."""
    return LeaseOut.of(lending.renew(lease_id))


@router.delete(
    "/leases/{lease_id}",
    status_code=204,
    dependencies=[require("worker")],
    responses=problem_responses(401, 403, 404),
)
def release_lease(lease_id: str, lending: LendingDep) -> Response:
    """Release a lease (the worker is done with the model)."""
    lending.release(lease_id)
    return Response(status_code=204)


@router.get(
    "/leases",
    response_model=LeaseList,
    dependencies=[require("read")],
    responses=problem_responses(401, 403),
)
async def list_leases(lending: LendingDep) -> LeaseList:
    """All active leases."""
    return LeaseList(leases=[LeaseOut.of(lease) for lease in lending.table.active()])
