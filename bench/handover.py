"""Handover bench: a running basehold passes its models to a successor (`serve --take-over`).

Holds fp32, bf16 and nf4 of the bench Llama (shareable: their memory is handed over) and an
8-bit one (held by a runner process: restarted by the successor), with a worker attached to
the fp32 model training through it (forward + backward of a small adapter on the frozen
base, lease TTL 6 s: renewals fall in the handover). Then starts the successor and prints,
from the same run:
- each model's original load time, and the time from the handover (the successor's log
  line `taking over from pid N`, written once it has the offer: a few ms after its hello)
  to the model ready in the successor (its `restored_at`, or `ready_at` where it loaded
  it again), both on the service's clock;
- the successor's whole start (process start -> every model ready), for comparison;
- HTTP during the handover: polls on fresh connections every 20 ms (refused, failed, p99);
- memory: the peak of shared memory (the arenas) during the handover vs before it;
- the worker: steps done, renewals failed, whether its lease stayed the same.

    .venv/bin/python bench/handover.py [--params-m 250]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from typing import Any

import httpx
import torch
from common import ROOT, launch, wait_ready, workspace

from service.worker.client import Client
from service.worker.lease_state import lease_of

SPECS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "nf4": {"dtype": "float32", "quantization": {"method": "bnb-4bit", "quant_type": "nf4"}},
    "int8": {"dtype": "float32", "quantization": {"method": "bnb-8bit"}},
}
SERVE = [sys.executable, "-m", "service", "serve"]
TOKENS = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])


def shmem() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


class Polls(threading.Thread):
    """GET /v1/models and POST {} (422; 503 `handing_over` while handing over) on a new
    connection every 20 ms."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[tuple[float, float]] = []  # (when, seconds)
        self.refused = 0
        self.failed: list[str] = []
        self.handing_over = 0  # changes answered 503 handing_over (to be retried)
        self.peak_shmem = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                with httpx.Client(base_url=self.url, timeout=30) as http:
                    answer = http.get("/v1/models")
                    if answer.status_code != 200:
                        self.failed.append(str(answer.status_code))
                    probe = http.post("/v1/models", json={})
                    code = probe.json().get("code") if probe.status_code == 503 else None
                    if code == "handing_over":
                        self.handing_over += 1
                    elif code is not None:
                        self.failed.append(f"POST {code}")
            except httpx.ConnectError:
                self.refused += 1
            except httpx.HTTPError as exc:
                self.failed.append(type(exc).__name__)
            self.latencies.append((time.time(), time.perf_counter() - started))
            self.peak_shmem = max(self.peak_shmem, shmem())
            time.sleep(0.02)


class Trainer(threading.Thread):
    """Trains a small adapter on the attached fp32 base until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.steps = 0
        self.error: BaseException | None = None
        self.lease_ids: list[str] = []
        self.lost = False
        self.attached = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        torch.set_num_threads(1)  # a core left for the services (this machine has two)
        try:
            with Client(self.url).attach("fp32", holder="bench-trainer", ttl_seconds=6) as base:
                hidden = base.config.hidden_size
                adapter = torch.nn.Linear(hidden, hidden, bias=False)
                optimizer = torch.optim.SGD(adapter.parameters(), lr=1e-3)
                self.lease_ids.append(lease_of(base).lease_id)
                self.attached.set()
                while not self.stop.is_set():
                    states = base.model(TOKENS).last_hidden_state
                    loss = adapter(states).pow(2).mean()
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    self.steps += 1
                self.lost = lease_of(base).lost
                self.lease_ids.append(lease_of(base).lease_id)
        except BaseException as exc:
            self.error = exc
            self.attached.set()


def ready_in_successor(timings: dict[str, str]) -> float:
    """When the successor had the model ready: when it took it over (`restored_at`), or
    when it loaded it again (`ready_at`), as the service's clock says."""
    moments = [timings["restored_at"], timings["ready_at"]]
    return max(datetime.fromisoformat(m.replace("Z", "+00:00")).timestamp() for m in moments)


def taken_at(log: str) -> float:
    """The time of the successor's `taking over from pid` line (the service's clock)."""
    for line in log.splitlines():
        if "taking over from pid" in line:
            stamp = line[:23]  # 2026-12-02 20:42:18,128
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise RuntimeError(f"the successor never said it took over:\n{log[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=250)
    args = parser.parse_args()
    work, path = workspace(args.params_m)
    path.joinpath("model.safetensors").read_bytes()  # a warm page cache for both runs
    env = {"BASEHOLD_MAX_CONCURRENT_LOADS": "1"}
    first = launch(work, env=env)
    successor: subprocess.Popen[bytes] | None = None
    original: dict[str, float] = {}
    ready_after: dict[str, float] = {}
    try:
        for name, spec in SPECS.items():
            start = time.perf_counter()
            first.http.post("/v1/models", json={"source": str(path), "name": name, **spec})
            wait_ready(first.http, name)
            original[name] = time.perf_counter() - start
        trainer = Trainer(f"http://127.0.0.1:{first.port}")
        trainer.start()
        trainer.attached.wait(300)
        if trainer.error is not None:
            raise trainer.error
        before_shmem = shmem()
        polls = Polls(f"http://127.0.0.1:{first.port}")
        polls.start()
        time.sleep(1.0)  # polls before the handover too
        steps_before = trainer.steps
        launched = time.time()
        log = (work / "successor.log").open("w")
        successor = subprocess.Popen(
            [*SERVE, "--port", str(first.port), "--log-level", "info", "--take-over"],
            cwd=ROOT,
            env={
                **os.environ,
                "BASEHOLD_STATE_DIR": str(work / "state"),
                "BASEHOLD_SOCKET": str(work / "run" / "basehold.sock"),
                **env,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        http = httpx.Client(base_url=f"http://127.0.0.1:{first.port}", timeout=60)
        pending = set(SPECS)
        deadline = time.monotonic() + 600
        while pending and time.monotonic() < deadline:
            try:
                if http.get("/healthz").json()["serving_pid"] == successor.pid:
                    for name in list(pending):
                        status = http.get(f"/v1/models/{name}").json()
                        if status["state"] == "ready":
                            ready_after[name] = ready_in_successor(status["timings"])
                            pending.discard(name)
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        time.sleep(3.0)  # the worker renews (TTL 6 s) with the successor
        polls.stop.set()
        trainer.stop.set()
        polls.join(60)
        trainer.join(60)
        first.process.wait(60)
        params = int(http.get("/v1/models/fp32").json()["parameters"])
        log.close()
        began = taken_at((work / "successor.log").read_text())
    finally:
        if successor is not None and successor.poll() is None:
            successor.terminate()
            successor.wait(120)
        first.stop()
        shutil.rmtree(work, ignore_errors=True)
    latencies = sorted(seconds for _, seconds in polls.latencies)
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
    quiet = sorted(seconds for when, seconds in polls.latencies if when < launched)
    quiet_p99 = quiet[int(len(quiet) * 0.99)] * 1000 if quiet else float("nan")
    window = sorted(seconds for when, seconds in polls.latencies if abs(when - began) < 1.0)
    print(
        f"\nbasehold handover bench: Llama {params / 1e6:.0f}M params x 4 specs, CPU, torch "
        f"{torch.__version__}; `serve --take-over` beside the running one\n"
    )
    print("| model | original load (s) | taken over -> ready in the successor (s) | ratio |")
    print("|---|---|---|---|")
    for name in SPECS:
        took = ready_after.get(name, float("nan")) - began
        print(f"| {name} | {original[name]:.2f} | {took:.2f} | {took / original[name]:.3f} |")
    whole = max(ready_after.values(), default=float("nan")) - launched
    print(f"| successor process start -> every model ready | | {whole:.2f} | |")
    print(
        f"\nHTTP during the handover: {len(latencies)} polls, {polls.refused} refused, "
        f"{len(polls.failed)} failed ({', '.join(sorted(set(polls.failed))) or '-'}), "
        f"{polls.handing_over} change(s) answered 503 handing_over (retried), "
        f"p99 {p99:.0f} ms, max {latencies[-1] * 1000 if latencies else 0:.0f} ms; before "
        f"the successor started: p99 {quiet_p99:.0f} ms; within 1 s of the takeover: "
        f"{len(window)} polls, max {window[-1] * 1000 if window else 0:.0f} ms"
    )
    print(
        f"memory: shared memory peak during the handover / before it: "
        f"{polls.peak_shmem / max(before_shmem, 1):.3f} ({before_shmem / 2**20:.0f} MiB before)"
    )
    print(
        f"worker: {trainer.steps - steps_before} training steps during the run after the "
        f"handover began, lease {'lost' if trainer.lost else 'kept'}, the same lease id: "
        f"{len(set(trainer.lease_ids)) == 1}, error: {trainer.error!r}"
    )


if __name__ == "__main__":
    main()
