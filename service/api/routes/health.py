"""Liveness and readiness (open, no key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.problems import problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process serves."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> JSONResponse | dict[str, str]:
    """503 until the registry is up, then 200."""
    if not getattr(request.app.state, "ready", False):
        return problem(503, "not_ready", "Not ready", "The service is starting; retry shortly.")
    return {"status": "ready"}
