"""Liveness and readiness (open, no key needed)."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.serving.api.deps import RegistryDep
from service.serving.api.gpu_sharing import bindings_mismatch
from service.serving.api.problems import problem
from service.serving.api.schemas import problem_responses
from service.serving.handover.kept import restarts

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, object]:
    """200 while the process serves: its pid, the pid it took over from (`serve
    --take-over`, a SIGHUP or a rollout; null when it started on its own), and how many
    times its keeper started it again after it died (`serve --keeper`; 0 without one)."""
    return {
        "status": "ok",
        "serving_pid": os.getpid(),
        "taken_over_from": getattr(request.app.state, "taken_over_from", None),
        "restarts": restarts(),
    }


async def _bindings(request: Request) -> str | None:
    """The bindings check (asked of NVML once, then cached) in a probe thread: a driver
    that hangs delays /readyz by at most a second, and the answer is known next time."""
    probes = getattr(request.app.state, "probes", None)
    if probes is None:  # an app without probe threads (a test's)
        return bindings_mismatch()
    try:
        return await asyncio.wait_for(probes.run(bindings_mismatch), timeout=1.0)
    except TimeoutError:
        return None


@router.get("/readyz", response_model=None, responses=problem_responses(503))
async def readyz(request: Request, registry: RegistryDep) -> JSONResponse | dict[str, object]:
    """503 until the registry is up and every model restored after a restart has settled
    (ready or failed), while the loader template starts or is down (it is restarted), or
    when the worker socket stopped serving; the body says which. Ready with cuda-bindings
    that do not match the driver: `bindings` says which package to install (GPU models
    are held privately until then)."""
    more = {"bindings": mismatch} if (mismatch := await _bindings(request)) else {}
    if not getattr(request.app.state, "ready", False):
        return problem(
            503, "not_ready", "Not ready", "The service is starting; retry shortly.", **more
        )
    arenas = getattr(request.app.state, "arenas", None)
    if arenas is not None and not arenas.serving:
        return problem(
            503,
            "socket_down",
            "Worker socket down",
            "The socket workers attach through stopped serving; see the server log and "
            "restart the service.",
            **more,
        )
    demo = getattr(request.app.state, "demo", None)  # `serve --demo` writing its checkpoint
    if demo is not None and demo.preparing:
        return problem(503, "demo_preparing", "Demo checkpoint being written", demo.detail, **more)
    loaders = getattr(request.app.state, "loaders", None)
    liveness = getattr(loaders, "liveness", None)  # a stand-in backend may have none
    template = liveness() if liveness is not None else None
    if template is not None and template.state == "starting":
        return problem(503, "loaders_starting", "Loaders starting", template.detail, **more)
    if template is not None and template.state == "down":
        return problem(
            503, "loader_unavailable", "Loader template unavailable", template.detail, **more
        )
    preload = getattr(request.app.state, "preload", None)
    preloading = preload.waiting(registry) if preload is not None else 0
    if preloading:
        waiting = "being submitted" if preloading < 0 else f"{preloading} still loading"
        return problem(
            503,
            "preloading",
            "Preloading",
            f"The models in BASEHOLD_PRELOAD are {waiting}; retry shortly (GET /v1/models "
            "shows their progress).",
            preloading=max(preloading, 0),
            **more,
        )
    restoring = registry.restoring()
    if restoring:
        return problem(
            503,
            "restoring",
            "Restoring",
            f"{restoring} model(s) held before the restart are still loading; retry shortly "
            "(GET /v1/models shows their progress).",
            restoring=restoring,
            **more,
        )
    return {"status": "ready", "restoring": 0, **more}
