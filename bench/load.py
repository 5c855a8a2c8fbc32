"""Load time through basehold's HTTP API vs a plain in-process from_pretrained.

Builds a ~250M-parameter Llama checkpoint locally (no hub), starts `basehold serve` on
127.0.0.1, and for each spec prints POST->ready over HTTP next to from_pretrained(...) plus
touching every tensor in this process, as a ratio, and the time of a repeat POST of a held
spec. Both sides read the same (page-cached) files in the same run, and both first load a
tiny checkpoint with the same spec, so neither pays one-time imports in the measurement.

    .venv/bin/python bench/load.py [--params-m 250]
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from common import reference_model, server, wait_ready, workspace

from tests.checkpoints import llama

SPECS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "nf4": {"dtype": "float32", "quantization": {"method": "bnb-4bit", "quant_type": "nf4"}},
}


def baseline(path: Path, spec: dict[str, Any]) -> float:
    start = time.perf_counter()
    model = reference_model(path, spec)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.float().sum() if tensor.is_floating_point() else tensor.sum()
    elapsed = time.perf_counter() - start
    del model
    gc.collect()
    return elapsed


def http_load(http: httpx.Client, path: Path, spec: dict[str, Any]) -> tuple[float, float, str]:
    """POST, then poll every 50 ms as a client would; returns (load s, repeat POST s, id)."""
    body = {"source": str(path), **spec}
    start = time.perf_counter()
    model_id = http.post("/v1/models", json=body).json()["id"]
    wait_ready(http, model_id)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    repeat = http.post("/v1/models", json=body)
    repeat_s = time.perf_counter() - start
    assert repeat.status_code == 200
    return elapsed, repeat_s, model_id


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=250)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="BASEHOLD_TORCH_THREADS for the server (default: cores - 1)",
    )
    args = parser.parse_args()
    work, path = workspace(args.params_m)
    tiny = llama(work / "models" / "llama-tiny")
    path.joinpath("model.safetensors").read_bytes()  # both sides start from a warm page cache
    rows = []
    params = 0
    env = {"BASEHOLD_TORCH_THREADS": str(args.torch_threads)} if args.torch_threads else {}
    with server(work, env) as served:
        http = served.http
        for name, spec in SPECS.items():
            baseline(tiny, spec)
            http.delete(f"/v1/models/{http_load(http, tiny, spec)[2]}")
            base_s = baseline(path, spec)
            http_s, repeat_s, model_id = http_load(http, path, spec)
            params = http.get(f"/v1/models/{model_id}").json()["parameters"]
            http.delete(f"/v1/models/{model_id}")
            rows.append((name, http_s, base_s, repeat_s))
    print(
        f"\nbasehold load bench: Llama {params / 1e6:.0f}M params, CPU, torch "
        f"{torch.__version__}, server torch threads: {args.torch_threads or 'cores - 1'}\n"
    )
    print(
        "| spec | HTTP POST->ready (s) | from_pretrained+touch (s) | ratio | "
        "repeat POST of held spec (ms) |"
    )
    print("|---|---|---|---|---|")
    for name, http_s, base_s, repeat_s in rows:
        print(
            f"| {name} | {http_s:.2f} | {base_s:.2f} | {http_s / base_s:.2f} | "
            f"{repeat_s * 1000:.1f} |"
        )


if __name__ == "__main__":
    main()
