"""What a basehold that hands over answers meanwhile, and after.

While it hands over, requests that change something (any method but GET, HEAD and
OPTIONS) answer 503 `handing_over` with `Retry-After: 1`: the successor takes the state as
it is then, and a change made in between would be lost. Reads are answered as usual. The
gate counts the changes in flight, so the handover starts once the last one has answered.

Once handed over (and still up: a pod waiting to be deleted), every request but
`/healthz` answers 503 `handed_over`, and /readyz with it: the service answers from the
successor."""

from __future__ import annotations

import threading
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from service.serving.api.problems import problem

READS = frozenset({"GET", "HEAD", "OPTIONS"})


class WriteGate:
    def __init__(self) -> None:
        self._closed = False
        self.handed_to: int | None = None  # the successor's pid, once handed over
        self._writes = 0
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def open(self) -> None:
        self._closed = False

    def hand_over(self, successor_pid: int) -> None:
        self.handed_to = successor_pid
        self._closed = True

    def enter(self) -> bool:
        """A change starts (False: the gate is closed, refuse it)."""
        with self._lock:
            if self._closed:
                return False
            self._writes += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._writes -= 1

    def wait_idle(self, timeout: float) -> bool:
        """Until no change is in flight (False: some still were after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._writes == 0:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)


class GateMiddleware:
    def __init__(self, app: ASGIApp, *, gate: WriteGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gate = self.gate
        if gate.handed_to is not None and scope.get("path") != "/healthz":
            response = problem(
                503,
                "handed_over",
                "Handed over",
                f"This basehold handed its models, leases and sockets to its successor (pid "
                f"{gate.handed_to}) and no longer serves; it waits to be stopped. Send the "
                "request again: the service answers from the successor.",
            )
            response.headers["retry-after"] = "1"
            await response(scope, receive, send)
            return
        if scope.get("method") in READS:
            await self.app(scope, receive, send)
            return
        if not gate.enter():
            response = problem(
                503,
                "handing_over",
                "Handing over",
                "This basehold is handing its models to its successor (an upgrade or a "
                "restart); changes wait until the successor serves, in about a second. Send "
                "the request again (Retry-After).",
            )
            response.headers["retry-after"] = "1"
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            gate.leave()
