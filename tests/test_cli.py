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
WORKER_KEY = "cli-worker-key-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cli")
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)]),
        "BASEHOLD_API_KEYS": json.dumps({KEY: ["admin"], WORKER_KEY: ["worker"]}),
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
    for verbose in (cli(server, "-v", "ls"), cli(server, "ls", "-v")):
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
    """Errors go to stderr (stdout stays for results), whole."""
    missing = cli(server, "unload", "no-such-model")
    assert missing.returncode == 1
    assert "model_not_found" in missing.stderr and "GET /v1/models" in missing.stderr
    failed = cli(server, "load", str(models_root / "llama"), "--task", "seq2seq-lm", "--wait")
    assert failed.returncode == 1 and "wrong_model_type" in failed.stderr
    unauthorized = cli(server, "ls", token=None)
    assert unauthorized.returncode == 1 and "unauthorized" in unauthorized.stderr
    started = time.monotonic()
    down = cli(server, "ls", "--url", "http://127.0.0.1:9")
    assert time.monotonic() - started < 10
    assert down.returncode == 2 and "cannot reach basehold at http://127.0.0.1:9" in down.stderr


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


# -- kubectl/docker-style conventions ---------------------------------------------------


def cli_in(
    cwd: Path, server: Server, *args: str, url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`basehold ARGS` run in `cwd` (relative paths), BASEHOLD_URL `url` (default the server's)."""
    from tests.spawn import run_module
    from tests.zygote import ZYGOTE

    env = {**os.environ, "BASEHOLD_URL": url or server.url, "BASEHOLD_TOKEN": KEY}
    env["COLUMNS"] = "40"  # a narrow pipe: nothing may be cut to fit it
    process = run_module("service", list(args), env=env, cwd=cwd, template=ZYGOTE)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(list(args), process.wait(), out, err)


def test_global_options_go_before_or_after_the_command(server: Server) -> None:
    """--url, --token and --json anywhere; the ones on the command line beat the
    environment (BASEHOLD_URL points nowhere here)."""
    nowhere = "http://127.0.0.1:9"
    before = cli_in(ROOT, server, "--url", server.url, "--json", "ls", url=nowhere)
    after = cli_in(ROOT, server, "ls", "--url", server.url, "--json", url=nowhere)
    split = cli_in(ROOT, server, "--json", "ls", "--url", server.url, url=nowhere)
    for result in (before, after, split):
        assert result.returncode == 0, result.stderr
        assert isinstance(json.loads(result.stdout), list)
    token_first = cli(server, "--token", "wrong-key", "ls", token=None)
    assert token_first.returncode == 1 and "unauthorized" in token_first.stderr


def test_version() -> None:
    from importlib.metadata import version

    result = run_basehold(["--version"], dict(os.environ))
    assert result.returncode == 0 and result.stdout.strip() == f"basehold {version('basehold')}"


def test_every_option_has_help() -> None:
    import argparse

    from service.cli import build_parser

    def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in parsers(build_parser())
        for action in parser._actions
        if not action.help
    ]
    assert not missing


def test_load_flags_a_relative_path_rm_and_json(server: Server, models_root: Path) -> None:
    """`./gpt2` from the models folder is sent as its absolute path, with --base-model,
    --base-revision and --pinned; --json gives the status; rm (and its alias unload)."""
    revision = "a" * 40
    loaded = cli_in(
        models_root,
        server,
        "load",
        "./gpt2",
        "--name",
        "relative",
        "--base-model",
        "openai-community/gpt2",
        "--base-revision",
        revision,
        "--pinned",
        "--dtype",
        "float32",
        "--wait",
        "--json",
    )
    assert loaded.returncode == 0, loaded.stderr
    status = json.loads(loaded.stdout)
    assert status["state"] == "ready" and status["pinned"] is True
    assert status["source"] == str(models_root / "gpt2")
    assert status["spec"]["base_model"] == {"hub_id": "openai-community/gpt2", "revision": revision}
    bare = cli_in(models_root, server, "estimate", "gpt2", "--json")  # a folder here: local
    assert bare.returncode == 0, bare.stderr
    assert json.loads(bare.stdout)["total_bytes"] > 0
    removed = cli(server, "rm", "relative", "--json")
    assert removed.returncode == 0 and json.loads(removed.stdout) == {
        "id": "relative",
        "unloaded": True,
    }
    assert "relative" not in cli(server, "ls").stdout
    assert json.loads(cli(server, "memory", "--json").stdout)["host"]["total_bytes"] > 0


def test_leases_list_and_revoke(server: Server, models_root: Path) -> None:
    from service.worker.client import BaseholdError, Client

    holder = "a-holder-with-a-long-name-" + "x" * 60  # longer than a narrow pipe's width
    with Client(server.url, token=KEY) as admin, Client(server.url, token=WORKER_KEY) as client:
        # a spec of its own (dtype): the same spec held under another name would alias it
        admin.ensure({"source": str(models_root / "gpt2"), "name": "leased", "dtype": "float16"})
        grant = client.lease("leased", holder)
        listed = json.loads(cli(server, "leases", "--json").stdout)
        assert [(x["lease_id"], x["holder"]) for x in listed] == [(grant["lease_id"], holder)]
        table = cli_in(ROOT, server, "leases")  # COLUMNS=40: still whole
        line = next(x for x in table.stdout.splitlines() if grant["lease_id"] in x)
        assert holder in line and "leased" in line
        revoked = cli(server, "leases", "revoke", grant["lease_id"])
        assert revoked.returncode == 0 and "revoked" in revoked.stdout
        with pytest.raises(BaseholdError) as gone:
            client.renew(grant["lease_id"], grant["secret"])
        assert gone.value.reason == "revoked"
        assert json.loads(cli(server, "leases", "--json").stdout) == []
        assert cli(server, "unload", "leased").returncode == 0  # the old name still works


def test_a_pipe_gets_whole_ids_and_errors_keep_their_brackets(
    server: Server, models_root: Path
) -> None:
    long_name = "a-model-whose-name-is-far-wider-than-forty-columns-" + "z" * 12
    gpt2 = str(models_root / "gpt2")
    loaded = cli(server, "load", gpt2, "--name", long_name, "--dtype", "bfloat16", "--wait")
    assert loaded.returncode == 0, loaded.stderr
    listed = cli_in(ROOT, server, "ls")  # COLUMNS=40
    rows = [line.split()[:2] for line in listed.stdout.splitlines()]
    assert [long_name, "ready"] in rows, listed.stdout
    # The service's detail names the pattern: rich markup must not eat `[a-z0-9]`.
    bad = cli(server, "load", str(models_root / "gpt2"), "--name", "Bad Name")
    assert bad.returncode == 1
    assert "^[a-z0-9][a-z0-9._-]{0,63}$" in bad.stderr, bad.stderr
    as_json = cli(server, "load", str(models_root / "gpt2"), "--name", "Bad Name", "--json")
    problem = json.loads(as_json.stderr)
    assert problem["status"] == 422 and "[a-z0-9]" in problem["detail"]
    assert cli(server, "rm", long_name).returncode == 0
