"""Load, list, show and unload held models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool

from service.common.errors import Forbidden
from service.common.load.spec import LoadRequest
from service.serving.api.deps import HubToken, RegistryDep, ScopesDep, require
from service.serving.api.schemas import ModelList, ModelStatus, problem_responses

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post(
    "",
    status_code=202,
    response_model=ModelStatus,
    dependencies=[require("admin", "ensure")],
    responses={
        200: {"model": ModelStatus, "description": "Identical spec already held"},
        **problem_responses(400, 401, 403, 404, 409, 422, 502, 503, 504, 507),
    },
)
def load_model(
    request: LoadRequest,
    registry: RegistryDep,
    response: Response,
    scopes: ScopesDep,
    x_hf_token: HubToken = None,
) -> ModelStatus:
    """Load a model in the background (202), or return the identical held one (200).

    An `ensure` key (a training job's) may do this too, but not pin a model (pinning
    changes what the operator's eviction may free) nor load with `trust_remote_code` (it
    runs the checkpoint's code in a loader); loads it starts may evict idle, unpinned,
    unleased models like any load."""
    if "admin" not in scopes:
        for asked, what in (
            (request.pinned, "Pinning a model"),
            (
                request.trust_remote_code,
                "Loading with trust_remote_code (it runs the checkpoint's code)",
            ),
        ):
            if asked:
                raise Forbidden(
                    f"{what} needs an admin key; this key has the 'ensure' scope. Drop the "
                    "option, or ask the operator to load the model."
                )
    record, created = registry.submit(request, x_hf_token)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/models/{record.id}"
    return ModelStatus.of(record)


@router.get(
    "",
    response_model=ModelList,
    dependencies=[require("read")],
    responses=problem_responses(401, 403),
)
async def list_models(registry: RegistryDep) -> ModelList:
    """All held, loading and failed models."""
    return ModelList(models=[ModelStatus.of(r) for r in registry.records()])


@router.get(
    "/{model_id}",
    response_model=ModelStatus,
    dependencies=[require("read")],
    responses=problem_responses(401, 403, 404),
)
async def show_model(model_id: str, registry: RegistryDep) -> ModelStatus:
    """One model's state, progress, memory and timings."""
    return ModelStatus.of(registry.get(model_id))


@router.delete(
    "/{model_id}",
    status_code=204,
    dependencies=[require("admin")],
    responses={
        202: {"model": ModelStatus, "description": "Load being cancelled"},
        **problem_responses(401, 403, 404, 409),
    },
)
async def unload_model(
    model_id: str,
    registry: RegistryDep,
    force: Annotated[bool, Query(description="Revoke active leases")] = False,
) -> Response:
    """Unload (204, memory returned) or cancel a load in progress (202)."""
    record = await run_in_threadpool(registry.unload, model_id, force=force)
    if record is None:
        return Response(status_code=204)
    body = ModelStatus.of(record).model_dump_json()
    return Response(body, status_code=202, media_type="application/json")
