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
import os
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

# `service.worker.timing` phases, in the order an attach passes them.
PARTS = {
    "ready_http": "wait for ready (GET status): only when the lease was refused",
    "lease_http": "POST the lease (HTTP round trip, handle in the answer)",
    "renewer": "start the lease's renewal thread",
    "validate": "parse and check the handle",
    "fds": "socket round trip until the fds are received",
    "map": "mmap the arena MAP_PRIVATE",
    "views": "tensor views of the mapping (and device segments)",
    "skeleton": "config and model skeleton on meta",
    "quant4": "4-bit modules: Linear4bit, Params4bit, QuantState",
    "bind": "parameters and buffers bound to the views",
    "check": "nothing left on meta",
    "hf_meta": "name, generation config, quantizer marks, eval, frozen",
    "ddp": "DDP tags, constructor wraps, copy watch",
    "guards": "move guard (and forward guard)",
    "other": "the rest of the total (unattributed)",
}


def worker_main(mode: str, arg: str) -> None:
    """Runs in the worker processes; libraries are imported before any measurement."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    from service.worker import timing
    from service.worker.client import Client

    if mode == "attach":
        url, model_id, count = arg.split(",")
        client = Client(url)
        times, splits = [], []
        with client.attach(model_id, holder="bench-warmup", ttl_seconds=60):
            pass
        before = private_bytes()
        for _ in range(int(count)):
            with timing.collect() as spent:
                start = time.perf_counter()
                with client.attach(model_id, holder="bench", ttl_seconds=60) as model:
                    times.append(time.perf_counter() - start)
                    spent["other"] = times[-1] - sum(spent.values())
                    splits.append(dict(spent))
                    grown = private_bytes() - before
                    del model
        print(json.dumps({"times": times, "splits": splits, "private_growth": grown}), flush=True)
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


def tree_cpu_seconds(pid: int) -> float:
    """CPU time used so far by `pid` and its live descendants (/proc/PID/stat)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited meanwhile
    return total / os.sysconf("SC_CLK_TCK")


def settle(pid: int, window: float = 0.5, busy: float = 0.05, timeout: float = 60) -> None:
    """Wait until the service and its children (a loader template it starts again after
    a load imports torch for seconds) use under `busy` of a core over `window` seconds,
    so the attaches are not timed against its background work; at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(pid)
        time.sleep(window)
        if tree_cpu_seconds(pid) - before < busy * window:
            return


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
    rows, splits = [], {}
    with server(work) as served:
        http = served.http
        for name, spec in SPECS.items():
            service_before = smaps(served.pid)["Pss"]
            status = wait_ready(
                http, http.post("/v1/models", json={"source": str(path), **spec}).json()["id"]
            )
            model_id, model_bytes = str(status["id"]), status["memory"]["footprint_bytes"]
            url = str(http.base_url)
            settle(served.pid)
            probe = spawn("attach", f"{url},{model_id},{args.attaches}")
            out, _ = probe.communicate(timeout=600)
            result = json.loads(out.strip().splitlines()[-1])
            splits[name] = result["splits"]
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
    print_splits(splits)


def print_splits(splits: dict[str, list[dict[str, float]]]) -> None:
    """Where one attach's time goes: per part, the p50 over the attaches (ms); the parts'
    p50s need not add up to the total's."""
    parts = list(PARTS) + sorted({p for s in splits.values() for a in s for p in a} - PARTS.keys())
    print("\nwhere an attach's time goes (p50 over the attaches, ms)\n")
    print("| part | what | " + " | ".join(splits) + " |")
    print("|---|---|" + "---|" * len(splits))
    for part in parts:
        cells = [
            f"{statistics.median(a.get(part, 0.0) for a in runs) * 1000:.2f}"
            for runs in splits.values()
        ]
        print(f"| {part} | {PARTS.get(part, '')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        main()
