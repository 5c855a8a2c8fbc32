"""The arena socket on its own (real Unix sockets, a real memfd): who may connect, how
long they may take, and that no client can starve the others or stop the loop."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.handles.fdpass import ArenaRefused, ArenaServer, Peer, SocketUnsafe, receive_arena
from tests.conftest import app_of

SECRET = "s3cret"


class Arena:
    """The authorize seam: lease `ok` with SECRET gets a copy of a memfd."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("basehold:test")
        os.write(self.fd, b"arena")
        self.calls: list[tuple[str, Peer]] = []

    def authorize(self, lease_id: str, secret: str, peer: Peer) -> list[int]:
        self.calls.append((lease_id, peer))
        if lease_id != "ok" or secret != SECRET:
            raise PermissionError("no")
        return [os.dup(self.fd)]


@pytest.fixture
def arena() -> Iterator[Arena]:
    made = Arena()
    yield made
    os.close(made.fd)


def serve(
    socket_path: Path,
    arena: Arena,
    deadline: float = 5.0,
    per_peer: int = 16,
) -> ArenaServer:
    server = ArenaServer(socket_path, arena.authorize, deadline=deadline, per_peer=per_peer)
    server.start()
    return server


def attach(socket_path: Path) -> float:
    """Seconds one real request took."""
    began = time.monotonic()
    fd = receive_arena(str(socket_path), "ok", SECRET, os.getuid(), timeout=30)
    try:
        assert os.pread(fd, 5, 0) == b"arena"
    finally:
        os.close(fd)
    return time.monotonic() - began


def connect(socket_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(socket_path))
    return sock


def test_idle_and_slow_clients_never_block_an_attach(socket_path: Path, arena: Arena) -> None:
    server = serve(socket_path, arena, deadline=30.0, per_peer=1000)
    idle = [connect(socket_path) for _ in range(60)]
    slow = [connect(socket_path) for _ in range(4)]
    for sock in slow:
        sock.sendall(b'{"lease_id": "ok", ')  # and never the rest
    try:
        assert attach(socket_path) < 5.0  # was 17-30 s behind 60 idle / 4 slow peers
        assert server.serving
    finally:
        for sock in idle + slow:
            sock.close()
        server.stop()


def test_a_whole_request_has_one_deadline(socket_path: Path, arena: Arena) -> None:
    server = serve(socket_path, arena, deadline=1.0)
    sock = connect(socket_path)
    began = time.monotonic()
    try:
        # One byte every 0.3 s would keep a per-recv timeout happy for ever.
        answer = b""
        for byte in b'{"lease_id": "ok", "secret": "s3cret"':
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.3)
            if time.monotonic() - began > 10:
                break
        sock.settimeout(10)
        answer = sock.recv(4096)
        assert json.loads(answer)["code"] == "timeout"
        assert time.monotonic() - began < 8
    finally:
        sock.close()
        server.stop()


def test_connections_per_peer_are_bounded(socket_path: Path, arena: Arena) -> None:
    server = serve(socket_path, arena, per_peer=3)
    held = [connect(socket_path) for _ in range(3)]
    extra = connect(socket_path)
    try:
        extra.settimeout(10)
        assert json.loads(extra.recv(4096))["code"] == "busy"
        with pytest.raises(ArenaRefused, match="busy"):
            receive_arena(str(socket_path), "ok", SECRET, os.getuid())
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the loop notices the close on its next pass
            try:
                attach(socket_path)
                break
            except ArenaRefused:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for sock in [*held, extra]:
            sock.close()
        server.stop()


def test_stop_is_immediate(socket_path: Path, arena: Arena) -> None:
    server = serve(socket_path, arena)
    began = time.monotonic()
    server.stop()  # right after start: a polling accept waited its whole timeout here
    assert time.monotonic() - began < 0.25
    assert not server.serving and not socket_path.exists()


def test_failures_of_the_pool_are_logged(
    socket_path: Path, arena: Arena, caplog: pytest.LogCaptureFixture
) -> None:
    server = ArenaServer(socket_path, lambda *_: [10**6])  # an fd number nobody has
    server.start()
    try:
        with caplog.at_level(logging.ERROR, "basehold.handles"), pytest.raises(ArenaRefused):
            receive_arena(str(socket_path), "ok", SECRET, os.getuid())
        deadline = time.monotonic() + 10
        while "answering a request failed" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
    finally:
        server.stop()


def test_the_worker_sends_no_secret_to_a_socket_of_another_uid(
    socket_path: Path, arena: Arena
) -> None:
    server = serve(socket_path, arena)
    try:
        with pytest.raises(ArenaRefused) as refused:
            receive_arena(str(socket_path), "ok", SECRET, os.getuid() + 4242)
        assert refused.value.code == "socket_impostor"
        assert "secret was not sent" in refused.value.detail
        time.sleep(0.2)  # nothing to poll for: the request must never arrive
        assert arena.calls == []
    finally:
        server.stop()


IMPOSTOR = textwrap.dedent(
    """
    import socket, sys
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[1])
    listener.listen(1)
    print("listening", flush=True)
    conn, _ = listener.accept()
    conn.settimeout(5)
    try:
        got = conn.recv(4096)
    except OSError:
        got = b""
    print("got:" + got.decode(errors="replace"), flush=True)
    """
)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a server as another uid")
def test_a_real_impostor_of_another_uid_gets_nothing(socket_path: Path) -> None:
    socket_path.parent.chmod(0o755)  # the impostor must reach its folder
    folder = socket_path.parent / "swapped"
    folder.mkdir()
    os.chown(folder, 4242, 4242)
    path = folder / "basehold.sock"
    proc = subprocess.Popen(
        [
            "setpriv",
            "--reuid=4242",
            "--regid=4242",
            "--clear-groups",
            sys.executable,
            "-c",
            IMPOSTOR,
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        with pytest.raises(ArenaRefused) as refused:
            receive_arena(str(path), "lease-x", SECRET, os.getuid())
        assert refused.value.code == "socket_impostor"
        out, _ = proc.communicate(timeout=30)
        assert SECRET not in out and "lease-x" not in out
    finally:
        proc.kill()
        proc.wait()


EMFILE = textwrap.dedent(
    """
    import os, resource, socket, sys, time
    from pathlib import Path
    from service.handles.fdpass import ArenaServer, receive_arena

    memfd = os.memfd_create("basehold:test")
    path = Path(sys.argv[1])
    server = ArenaServer(path, lambda *_: [os.dup(memfd)], per_peer=10_000)
    server.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    clients = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(s)
            s.connect(str(path))
    except OSError:
        pass
    deadline = time.monotonic() + 10
    while server.accept_errors == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    print("accept_errors", server.accept_errors > 0, flush=True)
    for s in clients:
        s.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    fd = receive_arena(str(path), "x", "y", os.getuid(), timeout=10)
    print("serving", server.serving, "fd", fd > 0, flush=True)
    server.stop()
    """
)


def test_running_out_of_fds_never_ends_the_accept_loop(socket_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", EMFILE, str(socket_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "accept_errors True" in proc.stdout, proc.stdout + proc.stderr
    assert "serving True fd True" in proc.stdout, proc.stdout + proc.stderr


def test_readyz_says_when_the_socket_stopped(client: object) -> None:
    from fastapi.testclient import TestClient

    assert isinstance(client, TestClient)
    assert client.get("/readyz").status_code == 200
    app_of(client).state.arenas.stop()
    answer = client.get("/readyz")
    assert answer.status_code == 503 and answer.json()["code"] == "socket_down"


def test_many_workers_at_once(socket_path: Path, arena: Arena) -> None:
    server = serve(socket_path, arena)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            attach(socket_path)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    server.stop()
    assert errors == []


def test_a_socket_folder_whose_parent_others_can_write_is_refused(
    socket_path: Path, arena: Arena
) -> None:
    parent = socket_path.parent / "shared"
    parent.mkdir()
    parent.chmod(0o777)  # anyone could rename our folder away and put theirs in its place
    folder = parent / "basehold"
    server = ArenaServer(folder / "basehold.sock", arena.authorize)
    with pytest.raises(SocketUnsafe, match="without the sticky bit"):
        server.start()
    parent.chmod(0o1777)  # like /tmp: only an entry's owner may rename it
    server.start()
    try:
        attach(folder / "basehold.sock")
    finally:
        server.stop()


def test_the_socket_group_is_a_gid_or_a_known_group_name() -> None:
    import grp

    from service.handles.fdpass import SocketUnsafe, resolve_group

    assert resolve_group(None) is None and resolve_group("") is None
    assert resolve_group("54322") == 54322
    root_group = grp.getgrgid(0).gr_name
    assert resolve_group(root_group) == 0
    with pytest.raises(SocketUnsafe, match="numeric gid"):
        resolve_group("no-such-group-basehold")


def test_a_peer_names_its_pid_or_another_pid_namespace() -> None:
    assert str(Peer(1234, 1000, 1001)) == "pid 1234 uid 1000 gid 1001"
    assert str(Peer(0, 1000, 1001)) == "another PID namespace uid 1000 gid 1001"
