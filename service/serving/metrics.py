"""Prometheus metrics, fed by the registry's one transition point (HTTP metrics come from
`service.serving.api.timing`).

Each app gets its own CollectorRegistry (no process globals), so tests can build many apps.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State

LOAD_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.models = Gauge("basehold_models", "Models by state", ["state"], registry=r)
        self.held_bytes = Gauge(
            "basehold_held_bytes", "Bytes held by ready models", ["device"], registry=r
        )
        self.leases = Gauge("basehold_leases", "Active leases", registry=r)
        self.arena_bytes = Gauge(
            "basehold_shared_arena_bytes", "Bytes in shared arenas", registry=r
        )
        self.load_seconds = Histogram(
            "basehold_load_seconds", "Time from start to ready", buckets=LOAD_BUCKETS, registry=r
        )
        self.load_failures = Counter(
            "basehold_load_failures_total", "Failed loads", ["code"], registry=r
        )
        self.evictions = Counter(
            "basehold_evictions_total", "Models evicted to make room", registry=r
        )
        self.leases_expired = Counter(
            "basehold_leases_expired_total",
            "Leases that ran out without being renewed or released (a worker died)",
            registry=r,
        )
        # Set at each scrape (deploy/monitoring/ alerts on them).
        self.oldest_load_seconds = Gauge(
            "basehold_oldest_load_seconds",
            "Age of the oldest load still queued or loading (0: none)",
            registry=r,
        )
        self.host_total_bytes = Gauge("basehold_host_memory_total_bytes", "Host RAM", registry=r)
        self.host_available_bytes = Gauge(
            "basehold_host_memory_available_bytes", "Host RAM available", registry=r
        )
        self.container_limit_bytes = Gauge(
            "basehold_container_memory_limit_bytes",
            "The cgroup memory limit that binds the service (absent: none applies)",
            ["cgroup"],
            registry=r,
        )
        self.container_usage_bytes = Gauge(
            "basehold_container_memory_usage_bytes",
            "That cgroup's working set (usage less inactive file cache)",
            ["cgroup"],
            registry=r,
        )
        self.gpu_total_bytes = Gauge(
            "basehold_gpu_memory_total_bytes", "GPU memory (NVML)", ["device"], registry=r
        )
        self.gpu_used_bytes = Gauge(
            "basehold_gpu_memory_used_bytes",
            "GPU memory in use by every process (NVML)",
            ["device"],
            registry=r,
        )
        self.http_requests = Counter(
            "basehold_http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "basehold_http_request_seconds",
            "HTTP latency",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        for state in State:
            if state != State.GONE:
                self.models.labels(state.value).set(0)

    def on_transition(self, record: ModelRecord, previous: State, target: State) -> None:
        """Registry listener: once per state change (creation comes as GONE -> QUEUED;
        progress as previous == target, which changes nothing here)."""
        if previous == target:
            return
        if previous != target and previous != State.GONE:
            self.models.labels(previous.value).dec()
        if target != State.GONE:
            self.models.labels(target.value).inc()
        if target == State.READY:
            for device, nbytes in record.by_device.items():
                self.held_bytes.labels(device).inc(nbytes)
            if record.load_seconds is not None:
                self.load_seconds.observe(record.load_seconds)
        if previous == State.READY:
            for device, nbytes in record.by_device.items():
                self.held_bytes.labels(device).dec(nbytes)
        if target == State.UNLOADING and record.evicted:
            self.evictions.inc()
        if target == State.FAILED and record.error is not None:
            self.load_failures.labels(record.error.code).inc()
