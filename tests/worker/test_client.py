"""service.worker.client against a live server: jobs that start before their base exists, ensure
(load-if-absent, one load for many jobs), attach by spec, and why a lease was lost; Client()
from the environment, a wrong URL failing in seconds, and the messages a worker gets when
its group or its cache folder is wrong (as another uid, for real)."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import torch

from service.worker.attach import AttachError
from service.worker.client import BaseholdError, Client, ServiceUnreachable, lease_of
from tests.conftest import until
from tests.serving.test_server_e2e import ROOT, Server

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(live_server: Server) -> Server:
    return live_server


def spec(models_root: Path, **extra: Any) -> dict[str, Any]:
    return {"source": str(models_root / "llama"), "dtype": "float32", **extra}


def loads_done(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("basehold_load_seconds_count"))
    return float(line.split()[-1])


def test_a_job_started_before_its_model_exists_waits_for_it(
    server: Server, models_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="basehold.client")
    got: dict[str, Any] = {}
    waiters = [
        threading.Thread(target=lambda: got.update(files=Client(server.url).files("later"))),
        threading.Thread(
            target=lambda: got.update(
                status=Client(server.url).wait("later", timeout=60, absent_ok=True)
            )
        ),
    ]
    for waiter in waiters:
        waiter.start()
    until(lambda: caplog.text.count("does not exist yet") >= 2, "the waiters said so")
    assert "Client.ensure" in caplog.text
    Client(server.url).load(**spec(models_root, name="later"))
    for waiter in waiters:
        waiter.join(timeout=120)
    assert got["status"]["state"] == "ready"
    assert (got["files"] / "config.json").is_file()
    with pytest.raises(BaseholdError) as absent:  # without absent_ok: at once, as before
        Client(server.url).wait("never")
    assert absent.value.code == "model_not_found"
    with pytest.raises(TimeoutError, match="still absent"):
        Client(server.url).wait("never", timeout=0.5, absent_ok=True)


def test_ensure_loads_once_for_many_jobs_and_raises_a_failed_loads_problem(
    server: Server, models_root: Path
) -> None:
    request = spec(models_root, name="shared")
    got: list[dict[str, Any]] = []
    jobs = [
        threading.Thread(target=lambda: got.append(Client(server.url).ensure(request)))
        for _ in range(3)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [s["state"] for s in got] == ["ready"] * 3
    assert {s["id"] for s in got} == {"shared"}
    assert loads_done(server) == 1
    assert Client(server.url).ensure(request)["id"] == "shared"
    assert loads_done(server) == 1
    with pytest.raises(BaseholdError) as failed:  # a Llama has no seq2seq head
        Client(server.url).ensure(spec(models_root, task="seq2seq-lm"))
    assert failed.value.code == "wrong_model_type"


def test_attach_by_spec_and_why_the_lease_ended(server: Server, models_root: Path) -> None:
    client = Client(server.url)
    tokens = torch.tensor([[1, 5, 9, 2]])
    with client.attach(spec=spec(models_root, name="by-spec"), ttl_seconds=3) as model:
        lease = lease_of(model)
        assert lease.model_id == "by-spec" and lease.state == "active"
        with torch.no_grad():
            model(tokens)
    assert (lease.state, lease.reason) == ("released", "released")
    with (
        pytest.raises(ValueError, match="not 'other'"),
        client.attach("other", spec=spec(models_root, name="by-spec")),
    ):
        pass
    with client.attach("by-spec", ttl_seconds=3) as model:
        lease = lease_of(model)
        client.unload("by-spec", force=True)
        until(lambda: lease.lost, "the renewer heard the lease ended", timeout=30)
        assert lease.reason == "unloaded"
        assert "its model was unloaded" in str(lease.detail)


# -- Client() without arguments, and a wrong address ------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A real HTTP service (a thread): answers a model's status, the state the test sets,
    and records each request's Authorization header."""

    state = "loading"
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        _Recorder.seen.append(self.headers.get("Authorization"))
        body = json.dumps({"id": "m", "state": _Recorder.state}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def recorder(port: int = 0) -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port() -> int:
    """A port nothing listens on (bound, then closed: refused from here on)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_client_reads_basehold_url_and_token_as_the_cli_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with recorder() as service:
        url = f"http://127.0.0.1:{service.server_address[1]}"
        monkeypatch.setenv("BASEHOLD_URL", url)
        monkeypatch.setenv("BASEHOLD_TOKEN", "env-key")
        _Recorder.seen.clear()
        with Client() as client:
            assert client.url == url and client.get("m")["state"] == "loading"
        with Client(token="") as client:  # "" asks for no token at all
            client.get("m")
        with Client(token="given") as client:
            client.get("m")
    assert _Recorder.seen == ["Bearer env-key", None, "Bearer given"]
    monkeypatch.delenv("BASEHOLD_URL")
    assert Client().url == "http://127.0.0.1:8000"


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
def test_a_wrong_url_fails_in_seconds_naming_it(host: str) -> None:
    """Never reached (refused, no such host): wait, ensure and files raise at once,
    whatever their timeout; waiting is for models, not for a wrong address."""
    url = f"http://{host}:{closed_port()}"
    calls = [
        lambda c: c.wait("m", timeout=600),
        lambda c: c.wait("m", timeout=600, absent_ok=True),
        lambda c: c.ensure({"source": "org/name"}, timeout=600),
        lambda c: c.files("m", wait=600),
        lambda c: c.models(),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(ServiceUnreachable) as unreachable, Client(url) as client:
            call(client)
        assert time.monotonic() - started < 10
        assert url in str(unreachable.value) and "BASEHOLD_URL" in str(unreachable.value)


class CountingClient(Client):
    """Counts the requests it tries, to know the waiter met the refused port."""

    tries = 0

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self.tries += 1
        return super()._request(method, path, **kwargs)


def test_a_service_once_reached_is_waited_for_through_a_restart() -> None:
    """Reached once, then refused (restarting on the same port): wait() keeps polling
    (tests/serving/state/test_restart.py: a port that hangs up, with the real service)."""
    got: dict[str, Any] = {}
    _Recorder.state = "loading"
    with recorder() as service:
        port = service.server_address[1]
        client = CountingClient(f"http://127.0.0.1:{port}")
        assert client.get("m")["state"] == "loading"
    with pytest.raises(httpx.ConnectError):  # a plain transport error now, not a wrong URL
        client.get("m")
    waiter = threading.Thread(target=lambda: got.update(client.wait("m", timeout=60, poll=0.05)))
    before = client.tries
    waiter.start()
    until(lambda: client.tries >= before + 3, "the waiter met the refused port thrice")
    assert waiter.is_alive()
    _Recorder.state = "ready"
    with recorder(port):
        waiter.join(timeout=60)
    assert got["state"] == "ready"
    client.close()


# -- permissions: as another uid, for real ----------------------------------------------

UID, GROUP = 54331, 54332  # numeric: no /etc/passwd or /etc/group entries needed
as_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs root and setpriv to run a worker as another uid",
)


def as_other_uid(code: str, home: Path, **env: str) -> str:
    """`code` as uid UID in no group; it may read (not write) what root can, to import
    this checkout. Returns what it printed."""
    command = [
        *("setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"),
        *("--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"),
        *(sys.executable, "-c", code),
    ]
    full_env = {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run(
        command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


ASK_SOCKET = """
import sys
from service.common.socket_protocol import ArenaRefused
from service.worker.socket import receive_fds
try:
    receive_fds(sys.argv[1] if len(sys.argv) > 1 else {path!r}, "lease-x", "secret", 0, 5)
except ArenaRefused as exc:
    print(exc.code, exc.detail)
"""


@as_root
@pytest.mark.parametrize("grouped", [True, False])
def test_a_worker_outside_the_socket_group_is_told_to_join_it(
    tmp_path: Path, grouped: bool
) -> None:
    """A real EACCES on connect: with BASEHOLD_SOCKET_GROUP's layout (0750/0660, that
    group) the worker is told the group to join; with a private folder (0700/0600), to
    set BASEHOLD_SOCKET_GROUP on the service."""
    folder = tmp_path / "socket"
    folder.mkdir(mode=0o750 if grouped else 0o700)
    path = folder / "basehold.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        if grouped:
            os.chown(folder, 0, GROUP)
            os.chown(path, 0, GROUP)
        path.chmod(0o660 if grouped else 0o600)
        said = as_other_uid(ASK_SOCKET.format(path=str(path)), tmp_path)
    assert said.startswith("socket_unreachable") and str(path) in said
    assert "share the folder" not in said
    if grouped:
        assert f"gid {GROUP}" in said and f"supplementalGroups: [{GROUP}]" in said
    else:
        assert "BASEHOLD_SOCKET_GROUP" in said


FETCH = """
from service.worker.files_cache import CacheUnwritable, fetch_files
listing = {"model_id": "m", "files": [{"name": "config.json", "sha256": "0" * 64}]}
try:
    fetch_files(listing, lambda name: b"{}")
except CacheUnwritable as exc:
    print(exc)
"""


@as_root
def test_an_unwritable_home_names_basehold_cache(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)  # root's: the worker's uid cannot write its cache there
    said = as_other_uid(FETCH, home)
    assert "BASEHOLD_CACHE" in said and str(home / ".cache" / "basehold") in said


def test_the_worker_socket_path_comes_from_basehold_socket(
    server: Server, models_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose mount of the socket folder differs from the service's path sets
    BASEHOLD_SOCKET: attach connects there, not to the path the handle names; a
    BASEHOLD_SOCKET where no socket is (an image's default for its service) is passed
    over; `socket_path=` is used as given."""
    mount = tmp_path / "mounted"
    mount.symlink_to(server.socket.parent)  # the same folder, seen under another path
    Client(server.url).ensure(spec(models_root, name="mounted"))
    monkeypatch.setenv("BASEHOLD_SOCKET", str(mount / server.socket.name))
    with Client(server.url).attach("mounted") as model:
        assert lease_of(model).state == "active"
    wrong = str(tmp_path / "elsewhere" / "basehold.sock")
    monkeypatch.setenv("BASEHOLD_SOCKET", wrong)
    with Client(server.url).attach("mounted") as model:  # the handle's path
        assert lease_of(model).state == "active"
    given = Client(server.url, socket_path=wrong)
    with pytest.raises(AttachError, match=re.escape(wrong)), given.attach("mounted"):
        pass
