"""Hear when a model changes instead of asking on a timer: `GET /v1/events` (Server-Sent
Events) read by a thread of its own, which wakes whoever waits for that model.

`Client.wait` polled the model's status every 0.25 s: a load was seen ready 0.125 s
after it was, on average (a 0.5 s load took 0.6 s for its job). With this, the waiter reads
the status again as soon as the service publishes a state change of the model (or a
restore), and still at least every `RECHECK_S` seconds. Where the stream cannot be had (a
proxy that does not pass it on, a restart in progress), the waiter polls as before until
the stream is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from types import TracebackType

import httpx

log = logging.getLogger("basehold.client")

SETTLE_S = 2.0  # the most a waiter waits for the stream before its first read
RECHECK_S = 5.0  # with the stream: the status is read at least this often all the same
_READ_S = 40.0  # the service pings every 15 s: a silent stream this long is broken
_WAKING = frozenset({"state", "restore"})


class Changes:
    """Changes of one model, heard from the service's event stream.

    Use: `arm()`, then read the status, then `wait(poll)`: a change published after
    `arm()` ends the wait at once. Read the status only after entering (it waits up to
    `SETTLE_S` for the subscription, so that no change between the two is missed)."""

    def __init__(self, http: httpx.Client, model_id: str, retry_s: float) -> None:
        self._model_id = model_id
        self._retry_s = retry_s
        self._stream_http = httpx.Client(
            base_url=http.base_url,
            headers=http.headers,
            timeout=httpx.Timeout(_READ_S, connect=min(_READ_S, retry_s + 5.0)),
        )
        self._changed = threading.Event()
        self._listening = threading.Event()
        self._tried = threading.Event()  # the first subscription answered or failed
        self._stop = threading.Event()
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="basehold-changes", daemon=True)

    def __enter__(self) -> Changes:
        self._thread.start()
        self._tried.wait(SETTLE_S)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def arm(self) -> None:
        """Forget the changes heard so far: call right before reading the status."""
        self._changed.clear()

    def wait(self, poll_s: float, left_s: float) -> None:
        """Until a change (or a stream that broke or came back) since `arm()`; at most
        `RECHECK_S` while the stream is heard, `poll_s` while it is not, and `left_s`."""
        self._changed.wait(max(0.0, min(RECHECK_S if self.listening else poll_s, left_s)))

    def close(self) -> None:
        self._stop.set()
        sock = self._socket
        if sock is not None:  # wakes the thread's blocked read (a close alone would not)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5.0)
        self._stream_http.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except (httpx.HTTPError, OSError, ValueError) as exc:
                if not self._stop.is_set():
                    log.debug("basehold: event stream for %s ended: %s", self._model_id, exc)
            finally:
                self._socket = None
                self._listening.clear()
                self._tried.set()
                self._changed.set()  # read the status now: a change may have gone unheard
            self._stop.wait(self._retry_s)

    def _listen(self) -> None:
        with self._stream_http.stream("GET", "/v1/events") as response:
            kind = response.headers.get("content-type", "").split(";")[0].strip()
            if response.status_code != 200 or kind != "text/event-stream":
                log.debug(
                    "basehold: no event stream here (%s, %s): polling",
                    response.status_code,
                    kind or "no content type",
                )
                self._stop.wait(max(self._retry_s, RECHECK_S))  # not back soon: poll meanwhile
                return
            stream = response.extensions.get("network_stream")
            found = stream.get_extra_info("socket") if stream is not None else None
            self._socket = found if isinstance(found, socket.socket) else None
            self._listening.set()
            self._tried.set()
            self._changed.set()  # subscribed: whatever the waiter read before may be old
            event = ""
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if not line:
                    event = ""
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in _WAKING and self._ours(event, line):
                    self._changed.set()

    def _ours(self, event: str, line: str) -> bool:
        if event == "restore":
            return True
        data = json.loads(line[5:])
        return isinstance(data, dict) and data.get("id") == self._model_id
