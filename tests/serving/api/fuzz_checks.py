"""Schemathesis checks of our own (loaded with SCHEMATHESIS_HOOKS=tests.serving.api.fuzz_checks)."""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.check
def problem_json_with_code(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx is application/problem+json with a stable `code` and a `detail` sentence."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/problem+json"), (
        f"{response.status_code} answered {content_type!r}, not application/problem+json"
    )
    body = json.loads(response.content)
    assert isinstance(body.get("code"), str) and body["code"], f"no `code` in {body}"
    assert isinstance(body.get("detail"), str) and body["detail"], f"no `detail` in {body}"
    assert body.get("status") == response.status_code, body
    return True
