"""Restart bench: how long until a SIGKILLed service holds its models again.

Holds three models (fp32, bf16, nf4 of the bench Llama) in one `basehold serve`, waits until
their snapshots are written, SIGKILLs it, starts it again on the same state directory
(models taken from their snapshots), SIGKILLs that one and starts it again with
`BASEHOLD_SNAPSHOTS=false` (models loaded again), and prints, from the same run: each
model's original load time vs its load time when restored without a snapshot, and the time
from each new process's start to `/readyz` 200 vs the sum of the three original loads.

`--keeper`: the same under `serve --keeper`; the serving process is SIGKILLed and its
keeper starts it again with the models' memory: prints the time from the kill to every
model ready vs the sum of the original loads.

    .venv/bin/python bench/restart.py [--params-m 250] [--keeper]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from common import Served, discard, launch, wait_ready, workspace

SPECS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "nf4": {"dtype": "float32", "quantization": {"method": "bnb-4bit", "quant_type": "nf4"}},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=250)
    parser.add_argument("--keeper", action="store_true", help="SIGKILL under a keeper")
    args = parser.parse_args()
    work, path = workspace(args.params_m)
    path.joinpath("model.safetensors").read_bytes()  # a warm page cache for both runs
    if args.keeper:
        keeper_run(work, path)
        return
    first = launch(work)
    original: dict[str, float] = {}
    ready_at: dict[str, str] = {}
    params = 0
    try:
        for name, spec in SPECS.items():
            start = time.perf_counter()
            first.http.post("/v1/models", json={"source": str(path), "name": name, **spec})
            status = wait_ready(first.http, name)
            original[name] = time.perf_counter() - start
            ready_at[name] = status["timings"]["ready_at"]
            params = int(status["parameters"])
        start = time.perf_counter()
        snapshots = work / "state" / "snapshots"
        while not all((snapshots / f"{name}.json").exists() for name in SPECS):
            if time.perf_counter() - start > 300:
                raise TimeoutError("the snapshots were not written in 300 s")
            time.sleep(0.05)
        written = time.perf_counter() - start
        first.kill()
        started = time.perf_counter()
        second = launch(work, port=first.port)  # returns once /readyz answers 200
        from_snapshots = time.perf_counter() - started
        try:
            taken = {
                name: second.http.get(f"/v1/models/{name}").json()["timings"]["ready_at"]
                == ready_at[name]  # a model taken from its snapshot keeps its load's times
                for name in SPECS
            }
        finally:
            second.kill()
        started = time.perf_counter()
        third = launch(work, port=first.port, env={"BASEHOLD_SNAPSHOTS": "false"})
        to_ready = time.perf_counter() - started
        try:
            restored = {
                name: float(third.http.get(f"/v1/models/{name}").json()["timings"]["load_seconds"])
                for name in SPECS
            }
        finally:
            third.stop()
    finally:
        first.stop()
        discard(work)
    total = sum(original.values())
    print(
        f"\nbasehold restart bench: Llama {params / 1e6:.0f}M params x 3 specs, CPU, torch "
        f"{torch.__version__}; SIGKILL, then a new process on the same state directory, with "
        f"snapshots (written {written:.2f} s after the last load was ready) and without\n"
    )
    print(
        "| model | original load: POST->ready (s) | restored load, no snapshot (s) | ratio | "
        "from its snapshot |"
    )
    print("|---|---|---|---|---|")
    for name in SPECS:
        print(
            f"| {name} | {original[name]:.2f} | {restored[name]:.2f} | "
            f"{restored[name] / original[name]:.2f} | {'yes' if taken[name] else 'no'} |"
        )
    print(
        f"| **total**: process start -> /readyz 200 vs sum of original loads, with snapshots | "
        f"{total:.2f} | {from_snapshots:.2f} | {from_snapshots / total:.2f} | |"
    )
    print(
        f"| **total**: the same without snapshots (`BASEHOLD_SNAPSHOTS=false`) | "
        f"{total:.2f} | {to_ready:.2f} | {to_ready / total:.2f} | |"
    )


def restarts(served: Served) -> int:
    """How many times the keeper started the service again (0 while none answers: the
    connection to the killed process is reset, the next one waits for the new one)."""
    try:
        return int(served.http.get("/healthz").json()["restarts"])
    except httpx.TransportError:
        return 0


def keeper_run(work: Path, path: Path) -> None:
    served = launch(work, command=[sys.executable, "-m", "service", "serve", "--keeper"])
    original: dict[str, float] = {}
    try:
        for name, spec in SPECS.items():
            start = time.perf_counter()
            served.http.post("/v1/models", json={"source": str(path), "name": name, **spec})
            wait_ready(served.http, name)
            original[name] = time.perf_counter() - start
        child = int(served.http.get("/healthz").json()["serving_pid"])
        killed = time.perf_counter()
        os.kill(child, signal.SIGKILL)
        while restarts(served) < 1:
            time.sleep(0.01)
        serving = time.perf_counter() - killed
        for name in SPECS:
            wait_ready(served.http, name)
        ready = time.perf_counter() - killed
    finally:
        served.stop()
        discard(work)
    total = sum(original.values())
    print(
        f"\nbasehold restart bench under a keeper: 3 specs, CPU, torch {torch.__version__}; "
        "the serving process SIGKILLed, its keeper starts it again\n"
    )
    print("| measure | seconds | vs sum of original loads |")
    print("|---|---|---|")
    print(f"| sum of original loads | {total:.2f} | 1.00 |")
    print(f"| kill -> serving again (/healthz) | {serving:.2f} | {serving / total:.3f} |")
    print(f"| kill -> every model ready | {ready:.2f} | {ready / total:.3f} |")


if __name__ == "__main__":
    main()
