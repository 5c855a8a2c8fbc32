"""Attaching to a held model vs every worker loading its own copy.

For a ~250M-parameter Llama: attach time (p50 over N attaches in an independent worker
process), the worker's private memory after attach as a fraction of the model's bytes
(/proc/PID/smaps_rollup), and the memory that 4 attached workers (+ the service's arena)
add against 4 workers that each call from_pretrained: the growth of each process's PSS
(shared pages split between the processes that map them, so nothing is counted twice or
missed) from before the model to all 4 holding it, libraries already imported on both
sides. Same run, same machine.

    .venv/bin/python bench/attach.py [--params-m 250] [--attaches 10] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, private_bytes, reference_model, server, smaps, wait_ready, workspace

SPECS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "nf4": {"dtype": "float32", "quantization": {"method": "bnb-4bit", "quant_type": "nf4"}},
}


def worker_main(mode: str, arg: str) -> None:
    """Runs in the worker processes; libraries are imported before any measurement."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    from service.worker.client import Client

    if mode == "attach":
        url, model_id, count = arg.split(",")
        client = Client(url)
        times = []
        with client.attach(model_id, holder="bench-warmup", ttl_seconds=60):
            pass
        before = private_bytes()
        for _ in range(int(count)):
            start = time.perf_counter()
            with client.attach(model_id, holder="bench", ttl_seconds=60) as model:
                times.append(time.perf_counter() - start)
                grown = private_bytes() - before
                del model
        print(json.dumps({"times": times, "private_growth": grown}), flush=True)
    elif mode == "hold":
        url, model_id = arg.split(",")
        print(smaps()["Pss"], flush=True)
        with Client(url).attach(model_id, holder="bench-hold", ttl_seconds=60) as model:
            with torch.no_grad():
                model(torch.tensor([[1, 2, 3]]))
            print("ready", flush=True)
            sys.stdin.readline()
    elif mode == "pretrained":
        path, spec_name = arg.split(",")
        print(smaps()["Pss"], flush=True)
        model = reference_model(Path(path), SPECS[spec_name])
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
            for tensor in model.parameters():
                tensor.sum()  # resident, as a training step would make it
        print("ready", flush=True)
        sys.stdin.readline()


def spawn(mode: str, arg: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", mode, arg],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def group_growth(mode: str, arg: str, workers: int, service: tuple[int, int] | None) -> int:
    """PSS the group adds: each worker's growth from its own pre-model reading, plus the
    service's growth since before the model was loaded, all read while every worker holds
    the model."""
    procs = [spawn(mode, arg) for _ in range(workers)]
    try:
        before = []
        for proc in procs:
            assert proc.stdout is not None
            before.append(int(proc.stdout.readline()))
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        grown = sum(smaps(p.pid)["Pss"] - b for p, b in zip(procs, before, strict=True))
        if service is not None:
            grown += smaps(service[0])["Pss"] - service[1]
        return grown
    finally:
        for proc in procs:
            proc.communicate("done\n", timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=250)
    parser.add_argument("--attaches", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    work, path = workspace(args.params_m)
    rows = []
    with server(work) as served:
        http = served.http
        for name, spec in SPECS.items():
            service_before = smaps(served.pid)["Pss"]
            status = wait_ready(
                http, http.post("/v1/models", json={"source": str(path), **spec}).json()["id"]
            )
            model_id, model_bytes = str(status["id"]), status["memory"]["footprint_bytes"]
            url = str(http.base_url)
            probe = spawn("attach", f"{url},{model_id},{args.attaches}")
            out, _ = probe.communicate(timeout=600)
            result = json.loads(out.strip().splitlines()[-1])
            service = (served.pid, service_before)
            attached = group_growth("hold", f"{url},{model_id}", args.workers, service)
            http.delete(f"/v1/models/{model_id}")
            own = group_growth("pretrained", f"{path},{name}", args.workers, None)
            rows.append(
                (
                    name,
                    model_bytes,
                    statistics.median(result["times"]),
                    result["private_growth"] / model_bytes,
                    attached,
                    own,
                )
            )
    print(
        f"\nbasehold attach bench: Llama ~{args.params_m}M params, CPU, "
        f"{args.attaches} attaches, {args.workers} workers\n"
    )
    print(
        "| spec | model bytes (MiB) | attach p50 (ms) | worker private after attach "
        "(% of model) | added PSS: service arena + 4 attached (MiB) | added PSS: "
        "4 x from_pretrained (MiB) "
        "| ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, nbytes, p50, frac, attached, own in rows:
        print(
            f"| {name} | {nbytes / 2**20:.0f} | {p50 * 1000:.0f} | {frac * 100:.2f}% | "
            f"{attached / 2**20:.0f} | {own / 2**20:.0f} | {attached / own:.2f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        main()
