"""The operator dashboard: one static page, no build step; it polls the JSON API.

Its Content-Security-Policy allows exactly the page's one inline script (by SHA-256),
its own styles, and requests to this service: injected markup can neither run a script
nor send anything elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])
PAGE = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"


@cache
def _page() -> tuple[str, str]:
    """The page and its Content-Security-Policy."""
    page = PAGE.read_text()
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in scripts
    )
    policy = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )
    return page, policy


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The page itself is open; the data it polls needs a `read` key when auth is on."""
    page, policy = _page()
    return HTMLResponse(page, headers={"Content-Security-Policy": policy})
