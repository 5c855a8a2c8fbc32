"""The real thing: `basehold serve` under uvicorn on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.demo import write_demo_checkpoint
from tests import checkpoints
from tests.zygote import ZYGOTE, Forked

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[str] | Forked
    url: str
    log: Path
    socket: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        """SIGKILL: nothing runs on the way out (what a crash or the OOM killer does)."""
        self.process.kill()
        self.process.wait(timeout=60)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        shutil.rmtree(self.socket.parent, ignore_errors=True)
        return code


def sse(url: str, timeout: float = 30) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every event of `url`/v1/events since the process started (Last-Event-ID 0), as
    (event type, data), for as long as the caller reads."""
    headers = {"Last-Event-ID": "0"}
    with httpx.stream("GET", f"{url}/v1/events", headers=headers, timeout=timeout) as stream:
        kind = ""
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                yield kind, json.loads(line.split(":", 1)[1])


def server_env(tmp_path: Path) -> dict[str, str]:
    """State in `tmp_path`; the arena socket in a short private folder of its own
    (AF_UNIX paths are limited to 107 bytes). No snapshots: their background copy holds a
    second fd of an arena for a moment, which tests that count a server's fds would see;
    tests/serving/state/test_snapshots.py turns them on."""
    tag = hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]
    return {
        "BASEHOLD_STATE_DIR": str(tmp_path / "state"),
        "BASEHOLD_SOCKET": f"/tmp/bh-e2e-{tag}/basehold.sock",
        "BASEHOLD_SNAPSHOTS": "false",
    }


def start(
    tmp_path: Path,
    args: list[str],
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
    port: int | None = None,
    ready: bool = True,
) -> Server:
    """Start `basehold serve` with its state in `tmp_path`/state and wait until /readyz
    answers 200 (`ready=False`: until it answers at all). Pass the `port` of a killed
    server to restart it where clients expect it."""
    port = port or free_port()
    log = tmp_path / f"server-{port}-{time.monotonic_ns()}.log"
    full_env = {**os.environ, **server_env(tmp_path), **(env or {})}
    command = [
        *(prefix or [sys.executable, "-m", "service"]),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    process: subprocess.Popen[str] | Forked | None = None
    if prefix is None:  # the real entry point, forked from a pre-imported template
        process = ZYGOTE.spawn(command[3:], full_env, ROOT, log)
    if process is None:
        with log.open("w") as out:
            process = subprocess.Popen(
                command, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True
            )
    server = Server(process, f"http://127.0.0.1:{port}", log, Path(full_env["BASEHOLD_SOCKET"]))
    deadline = time.monotonic() + 120
    # One client for the whole wait: `httpx.get` builds a client (and its TLS context,
    # ~25 ms of CPU) per call, which polling would pay every 50 ms.
    with httpx.Client(timeout=2) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"server exited early:\n{server.output()}")
            try:
                answer = http.get(f"{server.url}/readyz").status_code
                if answer == 200 or not ready:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    server.stop()
    raise AssertionError(f"server not ready:\n{server.output()}")


def wait_ready(url: str, model_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url) as http:  # one client per wait (see `start`)
        while time.monotonic() < deadline:
            body: dict[str, Any] = http.get(f"/v1/models/{model_id}").json()
            if body["state"] in ("ready", "failed"):
                return body
            time.sleep(0.05)
    raise AssertionError(f"{model_id} not ready")


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[Server]:
    server = start(tmp_path, ["--demo"])
    yield server
    server.stop()


def test_demo_checkpoint_loads_and_unloads(demo_server: Server, tmp_path: Path) -> None:
    output = demo_server.output()
    demo = tmp_path / "models" / "demo-llama"
    assert f"demo checkpoint at {demo}" in output
    assert "curl -s -X POST" in output and "127.0.0.1" in output
    response = httpx.post(
        f"{demo_server.url}/v1/models",
        json={"source": str(demo), "name": "demo", "dtype": "float32"},
    )
    assert response.status_code == 202
    status = wait_ready(demo_server.url, "demo")
    assert status["state"] == "ready" and status["architecture"] == "LlamaForCausalLM"
    listed = httpx.get(f"{demo_server.url}/v1/models/demo/files").json()
    names = {entry["name"] for entry in listed["files"]}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    memory = httpx.get(f"{demo_server.url}/v1/memory").json()
    assert memory["models"][0]["id"] == "demo"
    assert httpx.delete(f"{demo_server.url}/v1/models/demo").status_code == 204
    assert httpx.get(f"{demo_server.url}/v1/models/demo").status_code == 404


def test_sigterm_drains_and_unloads(tmp_path: Path) -> None:
    # Written here, in-process (~0.2 s): `--demo` then finds it and skips its own writer,
    # a cold process importing torch (~5 s); test_demo_checkpoint_loads_and_unloads runs
    # that writer.
    demo = write_demo_checkpoint(tmp_path / "models")
    assert demo == tmp_path / "models" / "demo-llama"
    server = start(tmp_path, ["--demo"])
    httpx.post(f"{server.url}/v1/models", json={"source": str(demo), "name": "demo"})
    wait_ready(server.url, "demo")
    assert server.stop() == 0
    output = server.output()
    assert "shutting down" in output
    assert "model demo: unloading -> gone" in output


def test_refuses_public_bind_without_keys(tmp_path: Path) -> None:
    from tests.spawn import run_basehold

    env = {**os.environ, "BASEHOLD_STATE_DIR": str(tmp_path)}
    result = run_basehold(["serve", "--host", "0.0.0.0", "--port", "1"], env, timeout=60)
    assert result.returncode == 2
    assert "BASEHOLD_API_KEYS" in result.stderr


@pytest.mark.slow
def test_out_of_memory_is_rolled_back(tmp_path: Path) -> None:
    models = tmp_path / "models"
    checkpoints.llama_100m(models / "big")
    checkpoints.llama(models / "small")
    # Each loader may map 200 MiB more than its template: the big load runs out in its
    # loader, the service and the next load never notice.
    env = {"MALLOC_ARENA_MAX": "2", "BASEHOLD_LOADER_MEMORY_LIMIT": "200MiB"}
    server = start(tmp_path, [], env=env)
    try:
        big = httpx.post(
            f"{server.url}/v1/models", json={"source": str(models / "big"), "dtype": "float32"}
        ).json()
        status = wait_ready(server.url, str(big["id"]))
        assert status["state"] == "failed", status
        assert status["error"]["code"] == "out_of_memory", status
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        small = httpx.post(
            f"{server.url}/v1/models", json={"source": str(models / "small"), "dtype": "float32"}
        ).json()
        assert wait_ready(server.url, str(small["id"]))["state"] == "ready"
    finally:
        assert server.stop() == 0
