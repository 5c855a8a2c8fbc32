"""Handover bench: a running basehold passes its models to a successor (`serve --take-over`).

Holds fp32, bf16 and nf4 of the bench Llama (shareable: their memory is handed over) and an
8-bit one (held by a runner process: handed over with it), with a worker process attached
to the fp32 model training through it (forward + backward of a small adapter on the frozen
base, lease TTL 6 s: renewals fall in the handover). Then starts the successor and prints,
from the same run:
- each model's original load time, and the time from the handover (the successor's log
  line `taking over from pid N`, written once it has the offer: a few ms after its hello)
  to the model ready in the successor (its log line `serving N model(s) handed over`,
  written once it serves them, or `ready_at` where it loaded it again), both on the
  service's clock; and to the moment a client polling every 10 ms saw it ready there;
- the successor's whole start (process start -> every model ready), for comparison;
- HTTP during the handover: polls on fresh connections every 20 ms (refused, failed, p99);
- memory: the peak of shared memory (the arenas) during the handover vs before it;
- the worker: steps done, renewals failed, whether its lease stayed the same.

    .venv/bin/python bench/handover.py [--params-m 250]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import queue
import subprocess
import sys
import threading
import time
from datetime import datetime
from typing import Any

import httpx
import torch
from common import ROOT, discard, launch, wait_ready, workspace

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
    """GET /v1/models and POST {} (422; 503 `handing_over` while handing over), each on a
    new connection (the standard library's client: nothing but the request is timed),
    every 20 ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[tuple[float, float]] = []  # (when, seconds) per request
        self.refused = 0
        self.failed: list[str] = []
        self.handing_over = 0  # changes answered 503 handing_over (to be retried)
        self.peak_shmem = 0
        self.stop = threading.Event()

    def _request(self, method: str, body: bytes | None) -> tuple[int, bytes] | None:
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, "/v1/models", body=body, headers=headers)
            answer = connection.getresponse()
            result = answer.status, answer.read()
        except ConnectionRefusedError:
            self.refused += 1
            return None
        except (OSError, http.client.HTTPException) as exc:
            self.failed.append(type(exc).__name__)
            return None
        finally:
            connection.close()
        self.latencies.append((time.time(), time.perf_counter() - started))
        return result

    def run(self) -> None:
        while not self.stop.is_set():
            answer = self._request("GET", None)
            if answer is not None and answer[0] != 200:
                self.failed.append(str(answer[0]))
            probe = self._request("POST", b"{}")
            if probe is not None and probe[0] == 503:
                code = json.loads(probe[1]).get("code")
                if code == "handing_over":
                    self.handing_over += 1
                else:
                    self.failed.append(f"POST {code}")
            self.peak_shmem = max(self.peak_shmem, shmem())
            time.sleep(0.02)


def train(url: str, steps: Any, attached: Any, stop: Any, results: Any) -> None:
    """A training worker in its own process, as one is: trains a small adapter on the
    attached fp32 base until `stop`, counting `steps`; puts (lease ids, lost, error)."""
    torch.set_num_threads(1)  # a core left for the services (this machine has two)
    lease_ids: list[str] = []
    lost = False
    error = None
    try:
        with Client(url).attach("fp32", holder="bench-trainer", ttl_seconds=6) as base:
            hidden = base.config.hidden_size
            adapter = torch.nn.Linear(hidden, hidden, bias=False)
            optimizer = torch.optim.SGD(adapter.parameters(), lr=1e-3)
            lease_ids.append(lease_of(base).lease_id)
            attached.set()
            while not stop.is_set():
                states = base.model(TOKENS).last_hidden_state
                loss = adapter(states).pow(2).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                steps.value += 1
            lost = lease_of(base).lost
            lease_ids.append(lease_of(base).lease_id)
    except BaseException as exc:
        error = repr(exc)
    attached.set()
    results.put((lease_ids, lost, error))


class Trainer:
    """The training worker's process (spawned: no fork of this process's torch)."""

    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._steps = context.Value("l", 0)
        self.attached = context.Event()
        self._stop = context.Event()
        self._results: Any = context.Queue()
        self.process = context.Process(
            target=train,
            args=(url, self._steps, self.attached, self._stop, self._results),
            daemon=True,
        )
        self.lease_ids: list[str] = []
        self.lost = False
        self.error: str | None = None

    @property
    def steps(self) -> int:
        return int(self._steps.value)

    def start(self) -> None:
        self.process.start()

    def finish(self, timeout: float = 60) -> None:
        self._stop.set()
        try:
            self.lease_ids, self.lost, self.error = self._results.get(timeout=timeout)
        except queue.Empty:
            self.error = "the trainer process did not answer"
        self.process.join(timeout)


def stamp(log: str, text: str) -> float:
    """The time of the successor's first log line that holds `text` (the service's clock)."""
    for line in log.splitlines():
        if text in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise RuntimeError(f"the successor never logged {text!r}:\n{log[-2000:]}")


def ready_in_successor(timings: dict[str, str], served: float) -> float:
    """When the successor had the model ready: when it served what it was handed (its log
    line), or, for a model it loaded again, its `ready_at` (the service's clock)."""
    ready = datetime.fromisoformat(timings["ready_at"].replace("Z", "+00:00")).timestamp()
    return max(served, ready)


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
    ready_after: dict[str, dict[str, str]] = {}  # timings in the successor
    seen: dict[str, float] = {}  # when the poll below saw it ready there
    try:
        for name, spec in SPECS.items():
            start = time.perf_counter()
            first.http.post("/v1/models", json={"source": str(path), "name": name, **spec})
            wait_ready(first.http, name)
            original[name] = time.perf_counter() - start
        trainer = Trainer(f"http://127.0.0.1:{first.port}")
        trainer.start()
        trainer.attached.wait(300)
        if not trainer.process.is_alive():
            trainer.finish(5)
            raise RuntimeError(f"the trainer ended: {trainer.error}")
        before_shmem = shmem()
        polls = Polls(first.port)
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
        client = httpx.Client(  # a new connection per request: none stays with the old one
            base_url=f"http://127.0.0.1:{first.port}",
            timeout=60,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        pending = set(SPECS)
        deadline = time.monotonic() + 600
        while pending and time.monotonic() < deadline:
            try:
                if client.get("/healthz").json()["serving_pid"] == successor.pid:
                    for status in client.get("/v1/models").json()["models"]:
                        name = status["id"]
                        if name in pending and status["state"] == "ready":
                            ready_after[name] = status["timings"]
                            seen[name] = time.time()
                            pending.discard(name)
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        time.sleep(3.0)  # the worker renews (TTL 6 s) with the successor
        polls.stop.set()
        trainer.finish(60)
        polls.join(60)
        first.process.wait(60)
        params = int(client.get("/v1/models/fp32").json()["parameters"])
        log.close()
        successor_log = (work / "successor.log").read_text()
        began = stamp(successor_log, "taking over from pid")
        served = stamp(successor_log, "model(s) handed over by pid")
    finally:
        if successor is not None and successor.poll() is None:
            successor.terminate()
            successor.wait(120)
        first.stop()
        discard(work)
    latencies = sorted(seconds for _, seconds in polls.latencies)
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
    quiet = sorted(seconds for when, seconds in polls.latencies if when < launched)
    quiet_p99 = quiet[int(len(quiet) * 0.99)] * 1000 if quiet else float("nan")
    window = sorted(seconds for when, seconds in polls.latencies if abs(when - began) < 1.0)
    print(
        f"\nbasehold handover bench: Llama {params / 1e6:.0f}M params x 4 specs, CPU, torch "
        f"{torch.__version__}; `serve --take-over` beside the running one\n"
    )
    print(
        "| model | original load (s) | taken over -> ready in the successor (s) | ratio | "
        "-> seen ready by a client (s) |"
    )
    print("|---|---|---|---|---|")
    ready = {name: ready_in_successor(timings, served) for name, timings in ready_after.items()}
    for name in SPECS:
        took = ready.get(name, float("nan")) - began
        saw = seen.get(name, float("nan")) - began
        print(
            f"| {name} | {original[name]:.2f} | {took:.3f} | {took / original[name]:.3f} | "
            f"{saw:.3f} |"
        )
    whole = max(ready.values(), default=float("nan")) - launched
    print(f"| successor process start -> every model ready | | {whole:.2f} | | |")
    print(
        f"\nHTTP during the handover: {len(latencies)} requests, {polls.refused} refused, "
        f"{len(polls.failed)} failed ({', '.join(sorted(set(polls.failed))) or '-'}), "
        f"{polls.handing_over} change(s) answered 503 handing_over (retried), "
        f"p99 {p99:.0f} ms, max {latencies[-1] * 1000 if latencies else 0:.0f} ms; before "
        f"the successor started: p99 {quiet_p99:.0f} ms; within 1 s of the takeover: "
        f"{len(window)} requests, max {window[-1] * 1000 if window else 0:.0f} ms"
    )
    print(
        f"memory: shared memory peak during the handover / before it: "
        f"{polls.peak_shmem / max(before_shmem, 1):.3f} ({before_shmem / 2**20:.0f} MiB before)"
    )
    print(
        f"worker: {trainer.steps - steps_before} training steps during the run after the "
        f"handover began, lease {'lost' if trainer.lost else 'kept'}, the same lease id: "
        f"{len(set(trainer.lease_ids)) == 1}, error: {trainer.error}"
    )


if __name__ == "__main__":
    main()
