"""A training job in another container: another uid, another PID namespace, only the socket
folder shared. Memfds need no shared namespace, so with BASEHOLD_SOCKET_GROUP a member of
the group attaches, trains LoRA and gets `from_pretrained`'s logits; a non-member cannot
connect, and the service logs who asked (pid 0: another PID namespace)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving.test_server_e2e import ROOT, Server, start, wait_ready

UID, GID = 54321, 54322  # numeric: no /etc/passwd or /etc/group entries needed
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")),
        reason="needs root, unshare and setpriv to run a worker as another uid",
    ),
]


@pytest.fixture
def server(tmp_path: Path, models_root: Path) -> Iterator[Server]:
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)]),
        "BASEHOLD_SOCKET_GROUP": str(GID),
    }
    # The service in a PID namespace of its own too, as in a container: the worker's pid
    # does not exist there (SO_PEERCRED says 0).
    isolated = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"]
    running = start(tmp_path, [], env=env, prefix=[*isolated, sys.executable, "-m", "service"])
    yield running
    # unshare does not pass SIGTERM on: stop the service (its child) directly.
    pid = running.process.pid
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        os.kill(int(child), signal.SIGTERM)
    running.stop()


def as_foreign_uid(
    argv: list[str], home: Path, groups: list[int]
) -> subprocess.CompletedProcess[str]:
    """`argv` (a Python program) as uid UID in a new PID namespace. It gets
    CAP_DAC_READ_SEARCH only to read root's Python install and this checkout; writing, and
    connecting to the 0660 socket, follow the permissions."""
    membership = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    command = [
        *("unshare", "--pid", "--fork", "--mount-proc"),
        *("setpriv", f"--reuid={UID}", f"--regid={UID}", membership),
        *("--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"),
        *(sys.executable, *argv),
    ]
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "BASEHOLD_CACHE": str(home / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_a_worker_of_another_uid_and_pid_namespace_attaches_through_the_group(
    server: Server, models_root: Path, tmp_path: Path
) -> None:
    folder = server.socket.parent
    info, sock = folder.stat(), server.socket.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o750, GID)
    assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, GID)
    source = str(models_root / "llama")
    body = {"source": source, "name": "shared", "dtype": "float32"}
    httpx.post(f"{server.url}/v1/models", json=body).raise_for_status()
    assert wait_ready(server.url, "shared")["state"] == "ready"
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, UID, UID)
    spec = {
        "source": source,
        "dtype": "float32",
        "auto_class": "AutoModelForCausalLM",
        "targets": ["q_proj", "v_proj"],
    }

    worker = ["-m", "tests.worker.worker", server.url, "shared", "train", json.dumps(spec)]
    member = as_foreign_uid(worker, home, [GID])
    assert member.returncode == 0, member.stderr[-4000:]
    result = json.loads(member.stdout.strip().splitlines()[-1])
    assert result["identical"], "the worker's logits differ from from_pretrained"
    assert result["adapter_changed"] and result["outside_arena"] == []
    assert f"another PID namespace uid {UID} gid {UID}" in server.output()

    # Not in the group: the socket itself refuses the connection.
    connect = f"import socket; socket.socket(socket.AF_UNIX).connect({str(server.socket)!r})"
    stranger = as_foreign_uid(["-c", connect], home, [])
    assert stranger.returncode != 0
    assert "PermissionError" in stranger.stderr, stranger.stderr[-3000:]
