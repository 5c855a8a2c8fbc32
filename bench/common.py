"""Shared bench plumbing: a generated checkpoint, a server on 127.0.0.1, /proc readings."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pretrained_kwargs(spec: dict[str, Any], device_map: str = "cpu") -> dict[str, Any]:
    """The `from_pretrained` arguments that match a basehold load request (dtype and
    bitsandbytes 4-bit): the baseline every bench compares the service with."""
    import torch
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, spec.get("dtype", "float32")),
        "device_map": device_map,
    }
    quant = spec.get("quantization")
    if quant is not None:
        assert quant["method"] == "bnb-4bit", quant
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=bool(quant.get("double_quant", False)),
            bnb_4bit_compute_dtype=getattr(torch, quant.get("compute_dtype", "float32")),
        )
    return kwargs


def reference_model(path: Path, spec: dict[str, Any], device_map: str = "cpu") -> Any:
    """`AutoModelForCausalLM.from_pretrained` of the same spec, with bitsandbytes' CPU
    repack off as on held models (see tests/reference.py)."""
    from transformers import AutoModelForCausalLM

    from tests.reference import from_pretrained

    return from_pretrained(AutoModelForCausalLM, path, **pretrained_kwargs(spec, device_map))


def llama_checkpoint(path: Path, params_m: int) -> Path:
    """A Llama of about `params_m` million parameters (hidden 1024, vocab 32000)."""
    from tests.checkpoints import llama

    layers = max(1, round((params_m * 1e6 - 2 * 32000 * 1024) / 12.6e6))
    return llama(path, hidden=1024, layers=layers, vocab=32000, heads=16)


def workspace(params_m: int) -> tuple[Path, Path]:
    """A fresh work folder with a generated Llama checkpoint under work/models/, removed
    when this process exits (a bench's checkpoint and state are a GB or more each run)
    unless BASEHOLD_BENCH_KEEP is set."""
    work = Path(tempfile.mkdtemp(prefix="basehold-bench-"))
    atexit.register(discard, work)
    return work, llama_checkpoint(work / "models" / "llama-bench", params_m)


def discard(work: Path) -> None:
    """Remove a bench's work folder now, unless BASEHOLD_BENCH_KEEP is set."""
    if not os.environ.get("BASEHOLD_BENCH_KEEP"):
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Served:
    """A `basehold serve` process on 127.0.0.1 and a client for it."""

    process: subprocess.Popen[bytes]
    http: httpx.Client
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=300)
        self.http.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    work: Path,
    port: int | None = None,
    timeout: float = 600,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Served:
    """Start a server with its state in `work`/state; return once /readyz answers 200.
    Raises if the process dies or `timeout` passes first. `command`: another way to
    serve (it gets `--port N --log-level warning`)."""
    port = port or free_port()
    full_env = {
        **os.environ,
        "BASEHOLD_STATE_DIR": str(work / "state"),
        "BASEHOLD_SOCKET": str(work / "run" / "basehold.sock"),
        **(env or {}),
    }
    serve = command or [sys.executable, "-m", "service", "serve"]
    process = subprocess.Popen(
        [*serve, "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=full_env
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} while starting")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"the server was not ready after {timeout:.0f}s")
        try:
            if http.get("/readyz").status_code == 200:
                return Served(process, http, port)
        except httpx.TransportError:
            pass
        time.sleep(0.05)


@contextmanager
def server(work: Path, env: dict[str, str] | None = None) -> Iterator[Served]:
    served = launch(work, env=env)
    try:
        yield served
    finally:
        served.stop()


def wait_ready(
    http: httpx.Client,
    model_id: str,
    poll: float = 0.05,
    timeout: float = 600,
    process: subprocess.Popen[bytes] | None = None,
) -> dict[str, Any]:
    """Poll until the model is ready; raises if it failed, `timeout` passes, or the
    server `process` died."""
    deadline = time.monotonic() + timeout
    while (status := http.get(f"/v1/models/{model_id}").json())["state"] not in ("ready", "failed"):
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server died ({process.returncode}) while {model_id} loaded")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model_id} still {status['state']} after {timeout:.0f}s")
        time.sleep(poll)
    assert status["state"] == "ready", status
    return dict(status)


def smaps(pid: int | str = "self") -> dict[str, int]:
    """Bytes per field of /proc/PID/smaps_rollup (Rss, Pss, Private_Dirty, ...)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        values[key.rstrip(":")] = int(value) * 1024
    return values


def private_bytes(pid: int | str = "self") -> int:
    fields = smaps(pid)
    return fields["Private_Clean"] + fields["Private_Dirty"]
