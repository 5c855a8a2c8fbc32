"""The served OpenAPI document, made to say what the service really answers.

FastAPI documents validation errors as `application/json` `HTTPValidationError`; every
error here is `application/problem+json` with a stable `code` (422 adds `errors`). Every
operation may also answer 400 `invalid_host` (no keys, foreign Host) and 413
`payload_too_large`, which the request guards send before routing.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

PROBLEM = {"$ref": "#/components/schemas/Problem"}
GUARD_RESPONSES = {
    "400": "Bad request (invalid_host: a Host the service does not answer to without keys)",
    "413": "Payload too large (payload_too_large: over BASEHOLD_MAX_BODY_BYTES)",
}


def _problem_content() -> dict[str, Any]:
    return {"application/problem+json": {"schema": PROBLEM}}


def build(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            for status, description in GUARD_RESPONSES.items():
                responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if status[0] in "45":
                    response["content"] = _problem_content()
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
