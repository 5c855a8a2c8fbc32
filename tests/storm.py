"""A storm against a live server: concurrent clients doing a random mix of load, unload,
forced unload, lease, renew, release, attach (worker processes) and estimate on three
models, with attached workers SIGKILLed at random. Used by tests/serving/api/test_storm.py
(short) and bench/storm.py (the full minute, with a table)."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.shared_memory import held_shared_memory
from tests.spawn import Process, spawn_worker

NAMES = ("s0", "s1", "s2")


@dataclass(frozen=True)
class Outcome:
    route: str
    status: int  # 0: the connection failed
    seconds: float


@dataclass
class StormReport:
    outcomes: list[Outcome] = field(default_factory=list)
    workers_started: int = 0
    workers_killed: int = 0

    def server_errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status >= 500 or o.status == 0]

    def table(self) -> str:
        by_route: dict[str, list[Outcome]] = {}
        for outcome in self.outcomes:
            by_route.setdefault(outcome.route, []).append(outcome)
        lines = [
            "| route | requests | statuses | p50 (ms) | p99 (ms) |",
            "|---|---|---|---|---|",
        ]
        for route in sorted(by_route):
            rows = by_route[route]
            times = sorted(o.seconds * 1000 for o in rows)
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            counts = Counter(o.status for o in rows)
            statuses = ", ".join(f"{s}: {n}" for s, n in sorted(counts.items()))
            lines.append(
                f"| {route} | {len(rows)} | {statuses} | {statistics.median(times):.1f} | "
                f"{p99:.1f} |"
            )
        return "\n".join(lines)


def footprint(pid: int) -> int:
    """What the service holds: its RSS plus the shared memory (the arenas) its processes
    hold, and nobody else's (tests/shared_memory.py)."""
    return int(psutil.Process(pid).memory_info().rss) + held_shared_memory(pid)


class Storm:
    def __init__(self, url: str, sources: list[Path], seconds: float, seed: int) -> None:
        self.url = url
        self.sources = dict(zip(NAMES, sources, strict=True))
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.report = StormReport()
        self._lock = threading.Lock()
        self._leases: list[tuple[str, str]] = []
        self._workers: list[Process] = []

    # -- one request ---------------------------------------------------------------------
    def _call(
        self, http: httpx.Client, method: str, path: str, route: str, **kwargs: Any
    ) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = http.request(method, path, **kwargs)
        except httpx.TransportError:
            self._record(Outcome(route, 0, time.perf_counter() - started))
            return None
        self._record(Outcome(route, response.status_code, time.perf_counter() - started))
        return response

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.report.outcomes.append(outcome)

    # -- the mix -------------------------------------------------------------------------
    def _load(self, http: httpx.Client, rng: random.Random) -> None:
        name = rng.choice(NAMES)
        body = {"source": str(self.sources[name]), "name": name, "dtype": "float32"}
        self._call(http, "POST", "/v1/models", "POST /v1/models", json=body)

    def _unload(self, http: httpx.Client, rng: random.Random, force: bool) -> None:
        route = "DELETE /v1/models/{id}" + ("?force" if force else "")
        params = {"force": "true"} if force else {}
        self._call(http, "DELETE", f"/v1/models/{rng.choice(NAMES)}", route, params=params)

    def _lease(self, http: httpx.Client, rng: random.Random) -> None:
        body = {"holder": "storm", "ttl_seconds": rng.choice((2, 5, 30))}
        route = "POST /v1/models/{id}/leases"
        answer = self._call(
            http, "POST", f"/v1/models/{rng.choice(NAMES)}/leases", route, json=body
        )
        if answer is not None and answer.status_code == 201:
            with self._lock:
                self._leases.append((answer.json()["lease_id"], answer.json()["secret"]))

    def _pick_lease(self, rng: random.Random, remove: bool) -> tuple[str, str] | None:
        with self._lock:
            if not self._leases:
                return None
            index = rng.randrange(len(self._leases))
            return self._leases.pop(index) if remove else self._leases[index]

    def _on_a_lease(self, http: httpx.Client, rng: random.Random, release: bool) -> None:
        """Renew (or release) one of the storm's leases, with its secret."""
        picked = self._pick_lease(rng, remove=release)
        if picked is None:
            return
        method, suffix = ("DELETE", "") if release else ("POST", "/renew")
        route = f"{method} /v1/leases/{{id}}{suffix}"
        headers = {"X-Lease-Secret": picked[1]}
        self._call(http, method, f"/v1/leases/{picked[0]}{suffix}", route, headers=headers)

    def _estimate(self, http: httpx.Client, rng: random.Random) -> None:
        body = {"source": str(self.sources[rng.choice(NAMES)]), "dtype": "float32"}
        self._call(http, "POST", "/v1/estimate", "POST /v1/estimate", json=body)

    def _observe(self, http: httpx.Client, rng: random.Random) -> None:
        path = rng.choice(("/v1/models", "/v1/memory", "/v1/leases"))
        self._call(http, "GET", path, f"GET {path}")

    def _attach(self, rng: random.Random) -> None:
        """A worker process attaches (a real Client.attach); some are SIGKILLed later."""
        with self._lock:
            self._workers = [w for w in self._workers if w.poll() is None]
            if len(self._workers) >= 2:
                return
        worker = spawn_worker(self.url, rng.choice(NAMES), "hold", {"ttl": 2}, quiet=True)
        with self._lock:
            self._workers.append(worker)
            self.report.workers_started += 1

    def _kill_a_worker(self, rng: random.Random) -> None:
        with self._lock:
            alive = [w for w in self._workers if w.poll() is None]
            if alive:
                rng.choice(alive).kill()
                self.report.workers_killed += 1

    def _client(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        ops = [
            (self._load, 6),
            (lambda h, r: self._unload(h, r, force=False), 2),
            (lambda h, r: self._unload(h, r, force=True), 2),
            (self._lease, 4),
            (lambda h, r: self._on_a_lease(h, r, release=False), 4),
            (lambda h, r: self._on_a_lease(h, r, release=True), 3),
            (self._estimate, 2),
            (self._observe, 4),
        ]
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while time.monotonic() < until:
                op = rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
                op(http, rng)
                time.sleep(rng.uniform(0, 0.02))

    def run(self, clients: int = 4) -> StormReport:
        until = time.monotonic() + self.seconds
        threads = [
            threading.Thread(target=self._client, args=(self.rng.random(), until))
            for _ in range(clients)
        ]
        for thread in threads:
            thread.start()
        while time.monotonic() < until:
            time.sleep(self.rng.uniform(0.5, 2.0))
            if self.rng.random() < 0.6:
                self._attach(self.rng)
            if self.rng.random() < 0.5:
                self._kill_a_worker(self.rng)
        for thread in threads:
            thread.join()
        self._stop_workers()
        return self.report

    def _stop_workers(self) -> None:
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                self.report.workers_killed += 1
            worker.wait(timeout=30)

    def settle(self) -> None:
        """Release what the storm left, unload every model, wait until nothing is held."""
        with httpx.Client(base_url=self.url, timeout=120) as http:
            for lease_id, secret in self._leases:
                http.delete(f"/v1/leases/{lease_id}", headers={"X-Lease-Secret": secret})
            deadline = time.monotonic() + 120
            while models := http.get("/v1/models").json()["models"]:
                for model in models:
                    http.delete(f"/v1/models/{model['id']}", params={"force": "true"})
                if time.monotonic() > deadline:
                    raise TimeoutError(f"models left after the storm: {models}")
                time.sleep(0.2)
