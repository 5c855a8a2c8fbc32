"""ASGI guards that run before routing, auth and body parsing.

- Bodies over `max_body_bytes` answer 413 `payload_too_large` before they are read in full:
  at once when `Content-Length` says so, else as soon as the streamed body passes the limit.
  This runs before the key check, so an unauthenticated client cannot make the service
  buffer a large body.
- Without API keys, a request whose `Host` is not a loopback name or one of
  `allowed_hosts` answers 400 `invalid_host`: a web page the operator visits cannot reach
  the service through a DNS name it rebinds to 127.0.0.1.
- A path with a control character (once percent-decoded: `%00` and the rest of C0, and
  DEL) answers 400 `invalid_path`, whatever route it is for: no model id, lease id or
  file name has one, a NUL cannot reach the kernel (a 500 before), and none reaches a
  log line or a header.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.common.errors import InvalidPath
from service.serving.api.problems import problem

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


async def _answer(
    scope: Scope, receive: Receive, send: Send, status: int, code: str, title: str, detail: str
) -> None:
    """The service's problem+json, sent before the app ever sees the request; the
    connection closes after it (the client may still be sending a body nobody reads)."""
    response = problem(status, code, title, detail)
    response.headers["connection"] = "close"
    await response(scope, receive, send)


def host_name(header: str) -> str:
    """The host part of a Host header: 'a.b:8000' -> 'a.b', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RequestGuards:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        check_host: bool,
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.check_host = check_host
        self.allowed_hosts = {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.check_host and not self._host_allowed(headers.get(b"host", b"")):
            await _answer(
                scope,
                receive,
                send,
                400,
                "invalid_host",
                "Invalid Host",
                "This service has no API keys and answers only to loopback names (localhost, "
                "127.0.0.1, ::1). Use one of those, or add this host to "
                "BASEHOLD_ALLOWED_HOSTS (better: configure BASEHOLD_API_KEYS).",
            )
            return
        if _CONTROL.search(scope.get("path", "")):
            await _answer(
                scope,
                receive,
                send,
                InvalidPath.status,
                InvalidPath.code,
                InvalidPath.title,
                "The path has a control character (a NUL, a line break, ...); no model id, "
                "lease id or file name has one. Check how the URL was built (percent-encoded "
                "%00-%1F or %7F).",
            )
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0 or length > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
        await self._bounded(scope, receive, send)

    def _host_allowed(self, raw: bytes) -> bool:
        name = host_name(raw.decode("latin-1"))
        return is_loopback(name) or name in self.allowed_hosts

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count a streamed body; past the limit, answer 413 and tell the app the client
        went away (it stops reading; whatever it answers then is dropped)."""
        seen = 0
        started = False
        refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    refused = True
                    if not started:
                        await self._too_large(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted, tracked)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _answer(
            scope,
            receive,
            send,
            413,
            "payload_too_large",
            "Payload too large",
            f"Request bodies are limited to {self.max_body_bytes} bytes "
            "(BASEHOLD_MAX_BODY_BYTES). Send a smaller body.",
        )
