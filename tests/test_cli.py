"""`basehold` client commands against a live server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub import LocalHub
from tests.serving.test_server_e2e import ROOT, Server, start
from tests.spawn import run_basehold

pytestmark = pytest.mark.e2e
KEY = "cli-admin-key-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cli")
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)]),
        "BASEHOLD_API_KEYS": json.dumps({KEY: ["admin"]}),
    }
    running = start(tmp, [], env=env)
    yield running
    running.stop()


def cli(server: Server, *args: str, token: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BASEHOLD_URL": server.url, "COLUMNS": "200"}
    env.pop("BASEHOLD_TOKEN", None)
    if token is not None:
        env["BASEHOLD_TOKEN"] = token
    return run_basehold(list(args), env)


def test_load_wait_ls_show_memory_unload(server: Server, models_root: Path) -> None:
    loaded = cli(
        server,
        "load",
        str(models_root / "gpt2"),
        "--name",
        "cli-gpt2",
        "--4bit",
        "--double-quant",
        "--dtype",
        "float32",
        "--wait",
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "cli-gpt2 ready" in loaded.stdout
    assert "HTTP Request" not in loaded.stdout + loaded.stderr  # httpx's lines: only with -v
    verbose = cli(server, "-v", "ls")
    assert "HTTP Request: GET" in verbose.stderr and "cli-gpt2" in verbose.stdout
    listed = cli(server, "ls")
    assert "cli-gpt2" in listed.stdout and "ready" in listed.stdout and "nf4" in listed.stdout
    shown = json.loads(cli(server, "show", "cli-gpt2").stdout)
    assert shown["quantization"]["double_quant"] is True
    assert "host" in cli(server, "memory").stdout
    assert cli(server, "unload", "cli-gpt2").returncode == 0
    assert "cli-gpt2" not in cli(server, "ls").stdout


def test_estimate(server: Server, models_root: Path) -> None:
    result = cli(server, "estimate", str(models_root / "llama"), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stdout
    assert "fits" in result.stdout and "cpu" in result.stdout


def test_errors_exit_non_zero_with_the_detail(server: Server, models_root: Path) -> None:
    missing = cli(server, "unload", "no-such-model")
    assert missing.returncode == 1
    assert "model_not_found" in missing.stdout and "GET /v1/models" in missing.stdout
    failed = cli(server, "load", str(models_root / "llama"), "--task", "seq2seq-lm", "--wait")
    assert failed.returncode == 1 and "wrong_model_type" in failed.stdout
    unauthorized = cli(server, "ls", token=None)
    assert unauthorized.returncode == 1 and "unauthorized" in unauthorized.stdout
    down = cli(server, "ls", "--url", "http://127.0.0.1:9")
    assert down.returncode == 2 and "cannot reach" in down.stdout


def test_the_cli_and_the_clients_http_calls_import_no_torch(
    server: Server, models_root: Path
) -> None:
    """`basehold ls` and the client's HTTP-only calls (ensure, wait, status) in a fresh
    interpreter: none of torch, transformers, accelerate, bitsandbytes gets imported."""
    code = f"""
import json, sys
from service.cli import main
from service.worker.client import Client
assert main(["ls"]) == 0
client = Client({server.url!r}, token={KEY!r})
status = client.ensure({{"source": {str(models_root / "gpt2")!r}, "name": "no-torch"}})
assert client.wait("no-torch")["state"] == status["state"] == "ready"
heavy = ("torch", "transformers", "accelerate", "bitsandbytes", "fastapi")
print(json.dumps([name for name in heavy if name in sys.modules]))
"""
    env = {**os.environ, "BASEHOLD_URL": server.url, "BASEHOLD_TOKEN": KEY}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def _download_steps(text: str) -> list[int]:
    """The percentages of `load --wait`'s plain `downloading` lines."""
    line = r"loading: downloading [\d.]+ \S+ of [\d.]+ MiB \((\d+)%\)"
    return [int(m) for m in re.findall(line, text)]


def test_load_wait_in_a_log_prints_the_download_in_tenths(
    hub_server: Server, hub: LocalHub
) -> None:
    """Not a terminal (a Kubernetes job's log): a line per phase and per tenth of the
    download, with bytes, then the result."""
    hub.faults.rate = sum(f.size for f in hub.repos["acme/bigger"].files.values()) / 4
    loaded = cli(
        hub_server,
        "load",
        "acme/bigger",
        "--name",
        "piped",
        "--dtype",
        "float32",
        "--wait",
        token=None,
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    steps = _download_steps(loaded.stdout)
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] > 0, loaded.stdout
    assert loaded.stdout.rstrip().splitlines()[-1].startswith("piped ready in")


def test_load_wait_in_a_terminal_draws_a_bar_with_the_download_bytes(
    hub_server: Server, hub: LocalHub
) -> None:
    """A real pseudo-terminal: rich's live bar shows the phase and the bytes (no log lines)."""
    hub.faults.rate = sum(f.size for f in hub.repos["acme/bigger"].files.values()) / 4
    env = {**os.environ, "BASEHOLD_URL": hub_server.url, "COLUMNS": "160", "TERM": "xterm"}
    env.pop("BASEHOLD_TOKEN", None)
    argv = ["load", "acme/bigger", "--name", "tty", "--dtype", "float32", "--wait"]
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", *argv],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        cwd=ROOT,
        env=env,
    )
    os.close(secondary)
    out = bytearray()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if select.select([primary], [], [], 0.5)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other side closed
                break
            if not chunk:
                break
            out += chunk
        elif process.poll() is not None:
            break
    os.close(primary)
    assert process.wait(timeout=30) == 0, out.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert re.search(r"loading: downloading.*\d+\.\d/\d+\.\d MB", text), text
    assert not _download_steps(text)  # the bar, not the log lines
    assert "tty ready in" in text


def test_the_start_block_names_the_urls_and_the_key_to_send(tmp_path: Path) -> None:
    """What `serve` prints once it listens (no server needed: the text itself)."""
    import socket

    from service.cli import display_url, start_lines
    from service.serving.settings import Settings

    assert display_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert display_url("::1", 8000) == "http://[::1]:8000"
    assert display_url("0.0.0.0", 8000) == f"http://{socket.gethostname()}:8000"
    keyed = Settings(state_dir=tmp_path, api_keys={KEY: ["admin"]})
    block = start_lines("http://node:8000", keyed, None)
    assert "dashboard: http://node:8000/" in block and "http://node:8000/docs" in block
    assert "API base:  http://node:8000/v1" in block
    assert "Authorization: Bearer <key>" in block and "BASEHOLD_API_KEYS" in block
    assert KEY not in block  # never a key itself
    open_block = start_lines("http://node:8000", Settings(state_dir=tmp_path), None)
    assert "Authorization" not in open_block
