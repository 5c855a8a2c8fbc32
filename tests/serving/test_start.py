"""`basehold serve` as a newcomer and an operator see it start: it answers at once (with
`--demo` too, the checkpoint written meanwhile), prints where to go, keeps the dashboard's
polls out of the access log, and a second instance on the same machine stops on one line
without leaving a process behind."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.demo import written
from tests.conftest import until
from tests.serving.test_server_e2e import Server, free_port, server_env, start
from tests.spawn import run_basehold

pytestmark = pytest.mark.e2e


@dataclass
class DemoStart:
    server: Server
    demo: Path
    answered_after: float  # seconds from the process start to its first HTTP answer
    first_readyz: dict[str, object]  # /readyz's body at that moment
    written_then: bool  # whether the checkpoint was there at that moment


@pytest.fixture(scope="module")
def demo_start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStart]:
    """A `serve --demo` on a fresh models root, watched from its first answer until ready."""
    tmp = tmp_path_factory.mktemp("start")
    demo = tmp / "models" / "demo-llama"
    began = time.monotonic()
    server = start(tmp, ["--demo"], ready=False)  # returns at /readyz's first answer
    answered_after = time.monotonic() - began
    written_then = written(demo)
    first = httpx.get(f"{server.url}/readyz", timeout=10).json()
    try:
        deadline = time.monotonic() + 300
        with httpx.Client(timeout=10) as http:
            while http.get(f"{server.url}/readyz").status_code != 200:
                assert server.process.poll() is None, server.output()
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.1)
        yield DemoStart(server, demo, answered_after, first, written_then)
    finally:
        server.stop()


def test_demo_start_answers_before_its_checkpoint_is_written(demo_start: DemoStart) -> None:
    # The server listened first: its first answers came while the checkpoint was not there
    # (writing it imports torch in a cold process: seconds), and /readyz said so.
    assert not demo_start.written_then
    assert demo_start.first_readyz["code"] == "demo_preparing", demo_start.first_readyz
    assert str(demo_start.demo) in str(demo_start.first_readyz["detail"])
    # A forked server answers in well under a second; a busy machine gets some slack.
    assert demo_start.answered_after < 10, demo_start.answered_after
    assert httpx.get(f"{demo_start.server.url}/healthz").status_code == 200
    # Ready (the fixture waited for 200) means the checkpoint is whole under its name.
    assert written(demo_start.demo)
    assert not [p for p in demo_start.demo.parent.iterdir() if "partial" in p.name]


def test_start_prints_where_to_go_then_how_to_load_the_demo(demo_start: DemoStart) -> None:
    output = demo_start.server.output()
    url = demo_start.server.url
    for line in (f"serving on {url}", f"dashboard: {url}/", f"{url}/docs", f"{url}/v1"):
        assert line in output, output
    assert "Authorization" not in output  # no keys set: no key hint
    # The start block prints when the server listens, the demo's lines once it is written.
    assert output.index(f"{url}/docs") < output.index(f"demo checkpoint at {demo_start.demo}")
    assert f"curl -s -X POST {url}/v1/models" in output


def test_polls_are_not_access_logged_but_errors_and_posts_are(demo_start: DemoStart) -> None:
    url = demo_start.server.url
    with httpx.Client(base_url=url, timeout=10) as http:
        for path in ("/healthz", "/readyz", "/v1/memory", "/v1/models", "/v1/leases"):
            assert http.get(path).status_code == 200, path
        assert http.get("/v1/memory?x=1").status_code == 200
        assert http.get("/").status_code == 200  # the dashboard page itself: not a poll
        assert http.get("/v1/models/no-such-model").status_code == 404
        assert http.post("/v1/models", json={}).status_code == 422
    line = re.compile(r'"POST /v1/models HTTP/1\.1" 422')
    deadline = time.monotonic() + 30
    while not line.search(output := demo_start.server.output()):
        assert time.monotonic() < deadline, output
        time.sleep(0.05)
    assert '"GET /v1/models/no-such-model HTTP/1.1" 404' in output
    # The 503s of /readyz while the demo was written stay logged (only 2xx polls are not).
    assert '"GET /readyz HTTP/1.1" 503' in output
    answered = re.compile(r'"GET (\S+) HTTP/1\.1" 2\d\d')
    logged = [m.group(1) for m in answered.finditer(output)]
    assert logged == ["/"], logged


def _marker() -> tuple[dict[str, str], str]:
    """An environment variable unique to this test, and how /proc/PID/environ shows it."""
    tag = uuid.uuid4().hex
    return {"BASEHOLD_TEST_MARK": tag}, f"BASEHOLD_TEST_MARK={tag}"


def _marked(mark: str) -> list[int]:
    """Every process whose environment holds `mark` (inherited by whatever it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if mark.encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("shared", ["port", "socket", "state dir"])
def test_second_instance_stops_on_one_line_and_leaves_nothing(
    demo_start: DemoStart, tmp_path: Path, shared: str
) -> None:
    first = demo_start.server
    env = {**os.environ, **server_env(tmp_path)}
    port = free_port()
    if shared == "port":
        port = int(first.url.rsplit(":", 1)[1])
        setting = "--port"
    elif shared == "socket":
        env["BASEHOLD_SOCKET"] = str(first.socket)
        setting = "BASEHOLD_SOCKET"
    else:
        env["BASEHOLD_STATE_DIR"] = str(first.log.parent / "state")  # as `start` sets it
        setting = "BASEHOLD_STATE_DIR"
    marker, mark = _marker()
    env.update(marker)
    env.pop("BASEHOLD_LOADER_TEMPLATE", None)  # it would start its own: it must not
    began = time.monotonic()
    result = run_basehold(
        ["serve", "--host", "127.0.0.1", "--port", str(port), "--demo"], env, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0], result.stderr
    assert "in use" in lines[0] or "another basehold" in lines[0], lines[0]
    assert result.stdout == ""  # no start block, no demo writer
    assert time.monotonic() - began < 30  # it stopped before starting anything slow
    assert _marked(mark) == []  # no loader template, no demo writer, nothing
    assert httpx.get(f"{first.url}/readyz").status_code == 200  # the first one serves on


def test_a_stop_while_the_demo_is_written_leaves_no_writer_and_no_half_checkpoint(
    tmp_path: Path,
) -> None:
    marker, mark = _marker()
    # Its own loader template (not the session's shared one), stopped while it starts.
    server = start(
        tmp_path, ["--demo"], env={**marker, "BASEHOLD_LOADER_TEMPLATE": ""}, ready=False
    )
    deadline = time.monotonic() + 60
    while not any(b"service.demo" in _cmdline(pid) for pid in _marked(mark)):
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    assert server.stop() == 0, server.output()
    # No demo writer, no loader template: a template stopped while it still started
    # may take a moment to end on a busy machine (it exits once it finds its folder gone).
    until(lambda: _marked(mark) == [], server.output(), timeout=10)
    # Stopped midway, or (a busy machine) finished before the stop: never half of one.
    models = tmp_path / "models"
    left = list(models.iterdir()) if models.exists() else []
    assert left in ([], [models / "demo-llama"]), left
    assert not left or written(left[0])
    # The writer was stopped quietly (a loader template stopped while it starts may still
    # say how its bind failed: that is the template's, not the demo's).
    assert "KeyboardInterrupt" not in server.output()
    assert "service/demo.py" not in server.output()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
