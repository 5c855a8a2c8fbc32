"""Hear when a model changes instead of asking on a timer: `GET /v1/events` (Server-Sent
Events) read by a thread of its own, which wakes whoever waits for that model.

`Client.wait` polled the model's status every 0.25 s: a load was seen ready 0.125 s
after it was, on average (a 0.5 s load took 0.6 s for its job). With this, the waiter reads
the status again as soon as the service publishes a state change of the model (by its id:
`track` adds the one an alias resolves to), whenever the stream breaks or comes back, and
at least every `RECHECK_S` all the same (a proxy that holds the stream back, an event the
buffer dropped). Where no stream can be had (a proxy that does not pass it on, a restart
in progress), the waiter polls as before until there is one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import ssl
import threading
from types import TracebackType

import httpx

log = logging.getLogger("basehold.client")

SETTLE_S = 2.0  # the most a waiter waits for the stream before its first read
RECHECK_S = 1.0  # with the stream: the status is read at least this often all the same
_READ_S = 40.0  # the service pings every 15 s: a silent stream this long is broken
_RETRY_S = (0.25, 2.0)  # reconnecting: the first pause, and the longest
_QUIT_S = 0.5  # how long `close` waits for the thread (a daemon: it ends on its own)


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every stream (a new httpx.Client makes its own: ~30-70 ms)."""
    return httpx.create_ssl_context()


class Changes:
    """Changes of one model, heard from the service's event stream.

    Use: `arm()`, then read the status, then `wait(...)`: a change published after `arm()`
    ends the wait at once. Read the status only after entering (it waits up to `SETTLE_S`
    for the subscription, so that no change between the two is missed)."""

    def __init__(self, http: httpx.Client, model_id: str) -> None:
        self._ids = {model_id}
        self._stream_http = httpx.Client(
            base_url=http.base_url,
            headers={**http.headers, "Accept-Encoding": "identity"},  # nothing held back
            timeout=httpx.Timeout(_READ_S, connect=10.0),
            verify=_tls(),
        )
        self._changed = threading.Event()
        self._listening = threading.Event()
        self._tried = threading.Event()  # the first subscription answered or failed
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the socket to shut down, and the stop that does it
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="basehold-changes", daemon=True)

    def __enter__(self) -> Changes:
        try:
            self._thread.start()
            self._tried.wait(SETTLE_S)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def track(self, model_id: str) -> None:
        """Also wake on changes of `model_id` (the id the waited-for name resolved to)."""
        self._ids.add(model_id)

    def arm(self) -> None:
        """Forget the changes heard so far: call right before reading the status."""
        self._changed.clear()

    def wait(self, poll_s: float, left_s: float) -> bool:
        """Until a change (or a stream that broke or came back) since `arm()`; at most
        `RECHECK_S` while the stream is heard, `poll_s` while it is not, and `left_s`.
        Whether one came."""
        return self._changed.wait(max(0.0, min(RECHECK_S if self.listening else poll_s, left_s)))

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            self._shut(self._socket)
        self._thread.join(timeout=_QUIT_S)
        with contextlib.suppress(Exception):
            self._stream_http.close()

    @staticmethod
    def _shut(sock: socket.socket | None) -> None:
        """Wake a read blocked on `sock` (closing it alone would not)."""
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        pause = _RETRY_S[0]
        while not self._stop.is_set():
            try:
                if self._listen():
                    pause = _RETRY_S[0]  # it was heard: try again soon
            except (httpx.HTTPError, OSError, ValueError) as exc:
                if not self._stop.is_set():
                    log.debug("basehold: event stream for %s ended: %s", self._ids, exc)
            except Exception:  # never let the waiter wait on a dead thread: poll instead
                log.debug("basehold: event stream for %s failed", self._ids, exc_info=True)
            finally:
                with self._lock:
                    self._socket = None
                self._listening.clear()
                self._tried.set()
                self._changed.set()  # read the status now: a change may have gone unheard
            self._stop.wait(pause)
            pause = min(pause * 2, _RETRY_S[1])

    def _listen(self) -> bool:
        """Read the stream until it ends; whether it was an event stream at all."""
        with self._stream_http.stream("GET", "/v1/events") as response:
            kind = response.headers.get("content-type", "").split(";")[0].strip()
            if response.status_code != 200 or kind != "text/event-stream":
                log.debug(
                    "basehold: no event stream here (%s, %s): polling",
                    response.status_code,
                    kind or "no content type",
                )
                return False
            stream = response.extensions.get("network_stream")
            found = stream.get_extra_info("socket") if stream is not None else None
            with self._lock:
                self._socket = found if isinstance(found, socket.socket) else None
                if self._stop.is_set():  # closed while this connected
                    return True
            self._listening.set()
            self._tried.set()
            self._changed.set()  # subscribed: whatever the waiter read before may be old
            self._read(response)
            return True

    def _read(self, response: httpx.Response) -> None:
        event = ""
        for line in response.iter_lines():
            if self._stop.is_set():
                return
            if not line:
                event = ""
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "state" and self._ours(line):
                self._changed.set()

    def _ours(self, line: str) -> bool:
        data = json.loads(line[5:])
        return isinstance(data, dict) and data.get("id") in self._ids
