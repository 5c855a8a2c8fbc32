"""Every error leaves as application/problem+json with a stable `code`."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.common.errors import BaseholdError

log = logging.getLogger("basehold.api")
PROBLEM_BASE = "https://basehold.dev/problems/"
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    401: "unauthorized",
    403: "forbidden",
    415: "unsupported_media_type",
}


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {
        "type": PROBLEM_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        body, status_code=status, media_type="application/problem+json", headers=headers
    )


async def _domain(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BaseholdError)
    return problem(exc.status, exc.code, exc.title, exc.message, **exc.extra())


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    detail = f"{where}: {first['msg']}. Fix the request body; see /docs for the schema."
    return problem(422, "invalid_spec", "Invalid request", detail, errors=errors)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    detail = f"{exc.detail} ({request.method} {request.url.path}). See /docs for the API."
    return problem(exc.status_code, code, code.replace("_", " ").capitalize(), detail)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    incident = uuid.uuid4().hex[:12]
    log.error(
        "unhandled error on %s %s [incident %s]",
        request.method,
        request.url.path,
        incident,
        exc_info=exc,
    )
    return problem(
        500,
        "internal",
        "Internal error",
        f"Something went wrong on the server (incident {incident}). "
        "Retry; if it persists, report the incident id with the server log.",
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(BaseholdError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unhandled)
