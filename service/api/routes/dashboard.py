"""The operator dashboard: one static page, no build step; it polls the JSON API."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])
PAGE = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"


@cache
def _page() -> str:
    return PAGE.read_text()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The page itself is open; the data it polls needs a `read` key when auth is on."""
    return HTMLResponse(_page())
