"""A short storm in CI (bench/storm.py runs the full minute): random concurrent traffic
and SIGKILLed workers against a live server; no 5xx, registry and memory agree at the
end, and memory is back to baseline within 5%."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.serving.test_server_e2e import start
from tests.storm import Storm, footprint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# 8 s after the warm-up: a few hundred requests on every route and a handful of workers
# attached and SIGKILLed (longer added little but time); bench/storm.py, or
# BASEHOLD_STORM_SECONDS, storms longer.
SECONDS = float(os.environ.get("BASEHOLD_STORM_SECONDS", "8"))
WARM_UP_SECONDS = 6.0


def test_storm(tmp_path: Path, models_root: Path) -> None:
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)]),
        "BASEHOLD_LEASE_REAP_SECONDS": "0.2",
        "BASEHOLD_MAX_CONCURRENT_LOADS": "2",
    }
    server = start(tmp_path, [], env=env)
    try:
        sources = [models_root / n for n in ("llama", "gpt2", "llama-tied")]
        # Warm-up: the same mix and concurrency, so that every code path and thread has
        # allocated what it keeps before the baseline is taken.
        storm = Storm(server.url, sources, WARM_UP_SECONDS, seed=20261128)
        storm.run()
        storm.settle()
        baseline = footprint(server.pid)
        storm = Storm(server.url, sources, SECONDS, seed=7)
        report = storm.run()
        storm.settle()
        print(
            f"\n{report.table()}\nworkers: {report.workers_started} started, "
            f"{report.workers_killed} killed"
        )
        assert report.server_errors() == [], report.server_errors()[:10]
        assert len(report.outcomes) > 100
        models = httpx.get(f"{server.url}/v1/models").json()["models"]
        memory = httpx.get(f"{server.url}/v1/memory").json()
        assert models == [] and memory["models"] == [] and memory["host"]["held_bytes"] == 0
        assert memory["host"]["shared_arena_bytes"] == 0
        after = footprint(server.pid)
        print(f"footprint: baseline {baseline / 2**20:.0f} MiB, growth {after - baseline:+d} B")
        assert after - baseline < 0.05 * baseline, (after - baseline) / 2**20
        assert "Traceback" not in server.output()
    finally:
        server.stop()
