"""Restart bench: how long until a SIGKILLed service holds its models again.

Holds three models (fp32, bf16, nf4 of the bench Llama) in one `basehold serve`, SIGKILLs it,
starts it again on the same state directory and prints, from the same run: each model's
original load time vs its load time when restored, and the time from the new process's
start to `/readyz` 200 vs the sum of the three original loads.

    .venv/bin/python bench/restart.py [--params-m 250]
"""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

import torch
from common import launch, wait_ready, workspace

SPECS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "nf4": {"dtype": "float32", "quantization": {"method": "bnb-4bit", "quant_type": "nf4"}},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=250)
    args = parser.parse_args()
    work, path = workspace(args.params_m)
    path.joinpath("model.safetensors").read_bytes()  # a warm page cache for both runs
    first = launch(work)
    original: dict[str, float] = {}
    params = 0
    try:
        for name, spec in SPECS.items():
            start = time.perf_counter()
            first.http.post("/v1/models", json={"source": str(path), "name": name, **spec})
            status = wait_ready(first.http, name)
            original[name] = time.perf_counter() - start
            params = int(status["parameters"])
        first.kill()
        started = time.perf_counter()
        second = launch(work, port=first.port)  # returns once /readyz answers 200
        to_ready = time.perf_counter() - started
        try:
            restored = {
                name: float(second.http.get(f"/v1/models/{name}").json()["timings"]["load_seconds"])
                for name in SPECS
            }
        finally:
            second.stop()
    finally:
        first.stop()
        shutil.rmtree(work, ignore_errors=True)
    total = sum(original.values())
    print(
        f"\nbasehold restart bench: Llama {params / 1e6:.0f}M params x 3 specs, CPU, torch "
        f"{torch.__version__}; SIGKILL, then a new process on the same state directory\n"
    )
    print("| model | original load: POST->ready (s) | restored load (s) | ratio |")
    print("|---|---|---|---|")
    for name in SPECS:
        print(
            f"| {name} | {original[name]:.2f} | {restored[name]:.2f} | "
            f"{restored[name] / original[name]:.2f} |"
        )
    print(
        f"| **total**: process start -> /readyz 200 vs sum of original loads | {total:.2f} | "
        f"{to_ready:.2f} | {to_ready / total:.2f} |"
    )


if __name__ == "__main__":
    main()
