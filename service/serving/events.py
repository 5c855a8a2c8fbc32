"""A bounded, numbered event buffer: state changes and progress for SSE subscribers.

Publishing is thread-safe (loads run in worker threads); subscribers are async. A client
that reconnects with Last-Event-ID gets every event after that id still in the buffer.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict[str, Any]


class EventBus:
    def __init__(self, capacity: int = 2048) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._next_id = 1
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the server's event loop (called at startup)."""
        self._loop = loop
        self._changed = asyncio.Event()

    def publish(self, type_: str, data: dict[str, Any]) -> Event:
        with self._lock:
            event = Event(
                self._next_id, type_, {**data, "time": datetime.now(timezone.utc).isoformat()}
            )
            self._next_id += 1
            self._events.append(event)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)
        return event

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def since(self, last_id: int) -> list[Event]:
        """The events after `last_id`, oldest first: read from the newest end, so that a
        subscriber woken for one new event does not scan the whole buffer (each of many
        waiting clients is woken for every event)."""
        newer: list[Event] = []
        with self._lock:
            for event in reversed(self._events):
                if event.id <= last_id:
                    break
                newer.append(event)
        newer.reverse()
        return newer

    @property
    def last_id(self) -> int:
        with self._lock:
            return self._next_id - 1

    async def stream(self, last_id: int) -> AsyncIterator[Event]:
        while True:
            waiter = self._changed
            events = self.since(last_id)
            for event in events:
                yield event
                last_id = event.id
            if not events and waiter is not None:
                await waiter.wait()
            elif waiter is None:
                await asyncio.sleep(0.5)
