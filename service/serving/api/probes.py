"""Memory probes for async routes: NVML and psutil calls block (a driver can hang), so
they run in a few threads of their own, never on the event loop. A probe stuck in the
driver holds one of these threads: not the loop, nor the threads that serve other
requests (leases, loads); further probes wait for a free one without blocking anything."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Probes:
    def __init__(self, threads: int = 2) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="probe")

    async def run(self, probe: Callable[[], T]) -> T:
        """`probe()`'s result, run in one of the probe threads."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, probe)

    def close(self) -> None:
        """At shutdown: a probe still stuck in the driver is left to finish on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
