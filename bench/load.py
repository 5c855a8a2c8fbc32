"""Load time through basehold's HTTP API vs a plain in-process from_pretrained.

Builds a ~250M-parameter Llama checkpoint locally (no hub), starts `basehold serve` on
127.0.0.1, and for each spec prints POST->ready over HTTP next to from_pretrained(...) plus
touching every tensor in this process, as a ratio, and the time of a repeat POST of a held
spec. Both sides read the same (page-cached) files in the same run, and both first load a
tiny checkpoint with the same spec, so neither pays one-time imports in the measurement.
Loads start once the service's loader template is idle: after /readyz it imports model
code in the background for a few seconds, which would share the cores with them (how soon
a first load is served after the start is `bench/serving.py`'s figure).

Also printed: the floor of an fp32 load (copying the checkpoint's bytes into a memfd once,
with `sendfile`, in this process, right before each fp32 load: the machine's speed drifts
within minutes, so each load is set against its own) and the load's peak memory against
the held model's bytes, sampled every 5 ms: the loader's anonymous pages beyond the
template it was forked from, plus the machine's shared memory (`Shmem` in /proc/meminfo:
the arena's memfd) beyond what it was before the load (a quiet machine is assumed). The
peak comes from one more load of each spec, not from the timed ones: sampling takes CPU
from the two cores the load runs on (listing /proc each time took ~4 ms of every 5 here),
so its time is printed apart. Loads are waited for as basehold's client does
(`Client.wait`, which hears the model ready on the event stream).

fp32 and bf16 times are medians of `--runs` loads (3) on each side, nf4 one load.

    .venv/bin/python bench/load.py [--params-m 250] [--runs 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, cast

import httpx
import torch
from common import reference_model, server, workspace

from service.loader.checkpoint import read_safetensors_header
from service.worker.client import Client
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


def memfd_floor(path: Path, runs: int = 3) -> float:
    """Seconds to copy `path` (page-cached) into a fresh memfd once: the least any load
    that holds the bytes in shared memory can take. Median of `runs`."""
    times = []
    size = path.stat().st_size
    with path.open("rb") as source:
        for _ in range(runs):
            start = time.perf_counter()
            target = os.memfd_create("bench-floor", os.MFD_CLOEXEC)
            done = 0
            while done < size:
                done += os.sendfile(target, source.fileno(), done, size - done)
            times.append(time.perf_counter() - start)
            os.close(target)
    return statistics.median(times)


def _layer_bytes(checkpoint: Path) -> int:
    """The float32 bytes of the first decoder layer's tensors, from the file's header."""
    total = 0
    for name, entry in read_safetensors_header(checkpoint).items():
        if name.startswith("model.layers.0."):
            begin, end = cast(list[int], entry["data_offsets"])
            total += end - begin
    return total


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _shmem() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    return 0


def _template(server_pid: int) -> int | None:
    for pid in _children(server_pid):
        try:
            if b"service.loader.forker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_template_idle(server_pid: int, quiet: float = 1.0, timeout: float = 180) -> float:
    """Seconds until the server's loader template has used no CPU for `quiet` s: once it
    serves, it imports model code in the background (`service.loader.imports.LATER`),
    which a load measured meanwhile would share the cores with."""
    start = time.monotonic()
    template = _template(server_pid)
    if template is None:
        raise RuntimeError("the server has no loader template")
    ticks, since = _cpu_ticks(template), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"the loader template was still busy after {timeout:.0f} s")
        time.sleep(0.1)
        if (now := _cpu_ticks(template)) != ticks:
            ticks, since = now, time.monotonic()
    return time.monotonic() - start


class LoaderMemory:
    """Samples, every 5 ms, the loaders of the server's template: the most anonymous bytes
    one of them held beyond what the template holds (fork shares the template's pages,
    counted in both) plus the shared memory the machine gained since the start (the
    arena's memfd, which a loader writes without mapping it)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.peak = 0
        self._shmem = _shmem()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> LoaderMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        template = _template(self.server_pid)
        loaders: list[int] = []
        samples = 0
        while template is not None and not self._stop.wait(0.005):
            if samples % 10 == 0 or not loaders:  # listing /proc costs ms: every 50 ms
                loaders = _children(template)
            samples += 1
            try:
                base = _status(template)["RssAnon"]
                anon = max((_status(pid)["RssAnon"] - base for pid in loaders), default=0)
                self.peak = max(self.peak, max(anon, 0) + _shmem() - self._shmem)
            except (OSError, KeyError):
                loaders = []  # a loader exited: list them again


def http_load(http: httpx.Client, path: Path, spec: dict[str, Any]) -> tuple[float, float, str]:
    """POST, then wait as basehold's client does (`Client.wait`: it hears the model ready
    on the event stream); returns (load s, repeat POST s, id)."""
    body = {"source": str(path), **spec}
    with Client(str(http.base_url), token="") as client:
        start = time.perf_counter()
        model_id = http.post("/v1/models", json=body).json()["id"]
        client.wait(model_id, timeout=600)
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
        help="BASEHOLD_TORCH_THREADS for the server (default: the service's own)",
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="fp32 and bf16: medians of this many loads each"
    )
    args = parser.parse_args()
    work, path = workspace(args.params_m)
    tiny = llama(work / "models" / "llama-tiny")
    path.joinpath("model.safetensors").read_bytes()  # both sides start from a warm page cache
    rows = []
    floors: list[float] = []  # the memfd floor, measured right before each fp32 load
    per_floor: list[float] = []  # each fp32 load / the floor measured before it
    params = layer = 0
    quantizing = 0.0
    env = {"BASEHOLD_TORCH_THREADS": str(args.torch_threads)} if args.torch_threads else {}
    with server(work, env) as served:
        http = served.http
        waited = wait_template_idle(served.pid)
        for name, spec in SPECS.items():
            baseline(tiny, spec)
            http.delete(f"/v1/models/{http_load(http, tiny, spec)[2]}")
            times, bases = [], []
            for _ in range(args.runs if name != "nf4" else 1):  # nf4: ~10 s a load
                bases.append(baseline(path, spec))
                if name == "fp32":  # next to each load: this machine's speed drifts
                    floors.append(memfd_floor(path / "model.safetensors", runs=1))
                http_s, repeat_s, model_id = http_load(http, path, spec)
                times.append(http_s)
                http.delete(f"/v1/models/{model_id}")
                if name == "fp32":
                    per_floor.append(http_s / floors[-1])
            with LoaderMemory(served.pid) as memory:  # its own load: sampling costs CPU
                sampled_s, _, model_id = http_load(http, path, spec)
            status = http.get(f"/v1/models/{model_id}").json()
            params, held = status["parameters"], status["memory"]["footprint_bytes"]
            http.delete(f"/v1/models/{model_id}")
            peak = memory.peak / held
            http_s, base_s = statistics.median(times), statistics.median(bases)
            rows.append((name, http_s, base_s, repeat_s, peak, sampled_s))
            if name == "nf4":
                layer = _layer_bytes(path / "model.safetensors")
                quantizing = peak - layer / held
    print(
        f"\nbasehold load bench: Llama {params / 1e6:.0f}M params, CPU, torch "
        f"{torch.__version__}, server torch threads: {args.torch_threads or 'default'}; "
        f"measured once the loader template was idle ({waited:.1f} s after /readyz)\n"
    )
    print(
        "| spec | HTTP POST->ready (s) | from_pretrained+touch (s) | ratio | "
        "repeat POST of held spec (ms) | load peak memory / model bytes | "
        "POST->ready of the sampled load (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, http_s, base_s, repeat_s, peak, sampled_s in rows:
        print(
            f"| {name} | {http_s:.2f} | {base_s:.2f} | {http_s / base_s:.2f} | "
            f"{repeat_s * 1000:.1f} | {peak:.2f} | {sampled_s:.2f} |"
        )
    print(
        f"\nnf4 peak less one decoder layer in float32 ({layer / 2**20:.0f} MiB, what "
        f"quantizing one layer may take beside the model) / model bytes = {quantizing:.2f}"
    )
    print(
        f"floor: the checkpoint copied into a memfd once (sendfile), right before each fp32 "
        f"load: {', '.join(f'{f:.2f}' for f in floors)} s; fp32 POST->ready / that floor: "
        f"{', '.join(f'{r:.2f}' for r in per_floor)}, median {statistics.median(per_floor):.2f}; "
        f"median load / median floor {rows[0][1] / statistics.median(floors):.2f}"
    )


if __name__ == "__main__":
    main()
