"""The serving process itself: start → /healthz and → /readyz, its RSS idle and holding
three models (fp32, nf4, 8-bit in a runner), and `basehold ls`, next to a process that only
imports what the service used to import (torch, transformers, accelerate, bitsandbytes)
in the same run, as ratios. And a small model's first load right after /readyz (the
template may still import the rest of its preload) next to the same load once more.

/readyz waits for the loader template, which imports what every `from_pretrained` needs
before it says ready (`service.loader.imports.FIRST`). The floor under it, timed right
before each start: `import torch` and `import transformers.modeling_utils` in a fresh
process.

    .venv/bin/python bench/serving.py [--params-m 60] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
from common import ROOT, free_port, smaps, wait_ready, workspace

from tests.checkpoints import llama

HEAVY = "import torch, transformers, accelerate, bitsandbytes"
TORCH = "import torch"
MODELING = "import transformers.modeling_utils"  # what every from_pretrained imports


def _seconds(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def _until(
    http: httpx.Client, path: str, started: float, process: subprocess.Popen[bytes]
) -> float:
    """Seconds from `started` until `path` answers 200 (polled every 10 ms, at most 300 s)."""
    while True:
        assert process.poll() is None, "the server exited"
        assert time.perf_counter() - started < 300, f"{path} never answered 200"
        try:
            if http.get(path).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.01)


def _load_seconds(http: httpx.Client, source: str) -> float:
    """POST → ready of an fp32 load of `source`, then unloaded (gone before this returns)."""
    started = time.perf_counter()
    model_id = http.post("/v1/models", json={"source": source, "dtype": "float32"}).json()["id"]
    wait_ready(http, model_id, poll=0.01)
    seconds = time.perf_counter() - started
    http.delete(f"/v1/models/{model_id}")
    deadline = time.monotonic() + 120
    while http.get(f"/v1/models/{model_id}").status_code != 404:
        assert time.monotonic() < deadline, f"{model_id} was not unloaded"
        time.sleep(0.01)
    return seconds


def _rss(pid: int) -> int:
    return smaps(pid)["Rss"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work, path = workspace(args.params_m)
    small = llama(work / "models" / "llama-small")
    heavy = [_seconds([sys.executable, "-c", HEAVY]) for _ in range(args.repeat)]
    health, ready, idle, first, following = [], [], [], [], []
    torch_s: list[float] = []
    modeling_s: list[float] = []
    held_rss = 0
    ls_s: list[float] = []
    for attempt in range(args.repeat):
        port = free_port()
        env = {
            **os.environ,
            "BASEHOLD_STATE_DIR": str(work / f"state-{attempt}"),
            "BASEHOLD_SOCKET": str(work / f"run-{attempt}" / "basehold.sock"),
            "BASEHOLD_MODEL_ROOTS": f'["{work / "models"}"]',
        }
        torch_s.append(_seconds([sys.executable, "-c", TORCH]))
        modeling_s.append(_seconds([sys.executable, "-c", MODELING]))
        started = time.perf_counter()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
        )
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        try:
            health.append(_until(http, "/healthz", started, process))
            ready.append(_until(http, "/readyz", started, process))
            idle.append(_rss(process.pid))
            first.append(_load_seconds(http, str(small)))
            following.append(_load_seconds(http, str(small)))
            if attempt == 0:
                bodies: list[dict[str, Any]] = [
                    {"source": str(path), "dtype": "float32"},
                    {"source": str(path), "quantization": {"method": "bnb-4bit"}},
                    {"source": str(small), "quantization": {"method": "bnb-8bit"}},
                ]
                for body in bodies:
                    wait_ready(http, http.post("/v1/models", json=body).json()["id"])
                held_rss = _rss(process.pid)
                cli = [sys.executable, "-m", "service", "ls", "--url", f"http://127.0.0.1:{port}"]
                ls_s = [_seconds(cli) for _ in range(args.repeat)]
        finally:
            process.terminate()
            process.wait(timeout=120)
            http.close()
    base = statistics.median(heavy)
    mib = 2**20
    print(f"\nbasehold serving-process bench ({os.cpu_count()} cores), medians of {args.repeat}\n")
    print("| measure | value | vs importing torch & co. in a fresh process |")
    print("|---|---|---|")
    print(f"| import torch, transformers, accelerate, bitsandbytes | {base:.2f} s | 1.00 |")
    for name, values in [
        ("start → /healthz", health),
        ("start → /readyz (loader template up)", ready),
    ]:
        value = statistics.median(values)
        print(f"| {name} | {value:.2f} s | {value / base:.2f} |")
    floor = statistics.median(modeling_s)
    print(f"| floor: `{TORCH}` (before each start) | {statistics.median(torch_s):.2f} s | |")
    print(f"| floor: `{MODELING}` (before each start) | {floor:.2f} s | |")
    ratios = [value / below for value, below in zip(ready, modeling_s, strict=True)]
    print(f"| start → /readyz / that floor, each start | {statistics.median(ratios):.2f} | |")
    one, two = statistics.median(first), statistics.median(following)
    print(f"| first load of a small model after /readyz (fp32) | {one:.2f} s | |")
    print(f"| the next load of it | {two:.2f} s | first / next: {one / two:.2f} |")
    value = statistics.median(ls_s)
    print(f"| `basehold ls` | {value:.2f} s | {value / base:.2f} |")
    print(f"| serving process RSS, idle | {statistics.median(idle) / mib:.0f} MiB | |")
    held = "three models held (fp32, nf4, 8-bit runner)"
    print(f"| serving process RSS, {held} | {held_rss / mib:.0f} MiB | |")


if __name__ == "__main__":
    main()
