"""Leases: lend a held model to a training worker as a zero-copy handle.

The routes are plain `def` (run in the threadpool): granting, renewing and releasing write
the state database, which never happens on the event loop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from service.serving.api.deps import KeyDep, LendingDep, ScopesDep, SettingsDep, is_admin, require
from service.serving.api.schemas import (
    LeaseGrant,
    LeaseList,
    LeaseOut,
    LeaseRequest,
    problem_responses,
)

router = APIRouter(prefix="/v1", tags=["leases"])


LeaseSecret = Annotated[
    str | None,
    Header(
        alias="X-Lease-Secret",
        max_length=256,
        description="the secret returned when the lease was granted (not needed with an admin key)",
    ),
]


@router.post(
    "/models/{model_id}/leases",
    status_code=201,
    response_model=LeaseGrant,
    dependencies=[require("worker")],
    responses=problem_responses(401, 403, 404, 409, 422, 429),
)
def create_lease(
    model_id: str,
    body: LeaseRequest,
    lending: LendingDep,
    scopes: ScopesDep,
    key: KeyDep,
    settings: SettingsDep,
) -> LeaseGrant:
    """Lease a ready model. The answer carries the lease's secret (shown once) and the
    handle that service.worker.client turns into a model on the service's pages. A worker key
    holds at most BASEHOLD_MAX_LEASES_PER_KEY leases on one model (admin keys are exempt)."""
    capped = None if is_admin(scopes) else key
    grant = lending.grant(
        model_id,
        body.holder,
        body.ttl_seconds,
        key=capped,
        max_per_key=settings.max_leases_per_key,
    )
    return LeaseGrant.of_grant(grant)


@router.post(
    "/leases/{lease_id}/renew",
    response_model=LeaseOut,
    dependencies=[require("worker", "admin")],
    responses=problem_responses(401, 403, 404),
)
def renew_lease(
    lease_id: str, lending: LendingDep, scopes: ScopesDep, secret: LeaseSecret = None
) -> LeaseOut:
    """Push expires_at out by the lease's TTL (needs the lease's secret, or an admin key)."""
    return LeaseOut.of(lending.renew(lease_id, secret, admin=is_admin(scopes)))


@router.delete(
    "/leases/{lease_id}",
    status_code=204,
    dependencies=[require("worker", "admin")],
    responses=problem_responses(401, 403, 404),
)
def release_lease(
    lease_id: str, lending: LendingDep, scopes: ScopesDep, secret: LeaseSecret = None
) -> Response:
    """Release a lease (needs the lease's secret, or an admin key)."""
    lending.release(lease_id, secret, admin=is_admin(scopes))
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
