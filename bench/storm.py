"""Storm bench: a minute of random concurrent traffic and SIGKILLed workers against a live
server holding three tiny models; prints requests by route and status, p50/p99 latency per
route, and the leak figures (the service's RSS + the shared memory it holds, against a
baseline taken after a warm-up storm in the same run).

    .venv/bin/python bench/storm.py [--seconds 60] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import ROOT, launch  # noqa: F401 - common puts the repo root on sys.path

from tests import checkpoints
from tests.storm import Storm, footprint

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="basehold-storm-"))
    models = work / "models"
    sources = [
        checkpoints.llama(models / "llama"),
        checkpoints.gpt2(models / "gpt2"),
        checkpoints.llama(models / "llama-tied", tied=True),
    ]
    served = launch(
        work,
        env={
            "BASEHOLD_MODEL_ROOTS": json.dumps([str(models)]),
            "BASEHOLD_LEASE_REAP_SECONDS": "0.2",
            "BASEHOLD_MAX_CONCURRENT_LOADS": "2",
        },
    )
    try:
        url = str(served.http.base_url).rstrip("/")
        warmup = Storm(url, sources, 10, seed=1)
        warmup.run(clients=1)
        warmup.settle()
        baseline = footprint(served.process.pid)
        storm = Storm(url, sources, args.seconds, seed=20261128)
        report = storm.run(clients=args.clients)
        storm.settle()
        after = footprint(served.process.pid)
        models_left = served.http.get("/v1/models").json()["models"]
        memory = served.http.get("/v1/memory").json()
    finally:
        served.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nbasehold storm bench: {args.seconds:.0f} s, {args.clients} clients, "
        f"{len(report.outcomes)} requests, workers {report.workers_started} started / "
        f"{report.workers_killed} SIGKILLed\n"
    )
    print(report.table())
    print(
        f"\n| leak check | value |\n|---|---|\n"
        f"| responses >= 500 or failed connections | {len(report.server_errors())} |\n"
        f"| models left / held bytes after settling | {len(models_left)} / "
        f"{memory['host']['held_bytes']} |\n"
        f"| RSS + shared: baseline (MiB) | {baseline / MiB:.0f} |\n"
        f"| RSS + shared: after (MiB) | {after / MiB:.0f} |\n"
        f"| growth | {(after - baseline) / baseline * 100:+.1f}% |"
    )


if __name__ == "__main__":
    main()
