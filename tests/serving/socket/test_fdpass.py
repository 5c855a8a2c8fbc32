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
from typing import Any

import pytest

from service.common.socket_protocol import ArenaRefused
from service.serving.socket.server import ArenaServer, Peer, SocketUnsafe
from service.worker.socket import receive_arena
from tests.conftest import app_of, until

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
    **limits: Any,
) -> ArenaServer:
    server = ArenaServer(
        socket_path, arena.authorize, deadline=deadline, per_peer=per_peer, **limits
    )
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
    # grace: held connections stay young, so none is closed to make room for a new one.
    server = serve(socket_path, arena, per_peer=3, grace=60.0)
    held = [connect(socket_path) for _ in range(3)]
    extra = connect(socket_path)
    try:
        extra.settimeout(10)
        assert json.loads(extra.recv(4096))["code"] == "busy"
        began = time.monotonic()
        with pytest.raises(ArenaRefused, match="busy"):
            receive_arena(str(socket_path), "ok", SECRET, os.getuid(), timeout=0.5)
        assert 0.4 < time.monotonic() - began < 5  # retried until its deadline, then told
        held.pop().close()
        attach(socket_path)  # the client retries busy until the slot is free
    finally:
        for sock in [*held, extra]:
            sock.close()
        server.stop()


def test_requests_waiting_for_an_answer_count_against_the_total(
    socket_path: Path, arena: Arena
) -> None:
    """A slow authorization (the state database busy) holds every complete request in the
    answering pool: the pool's queue is bounded by the total cap, not by memory."""
    release = threading.Event()

    def slow(lease_id: str, secret: str, peer: Peer) -> list[int]:
        release.wait(30)
        return arena.authorize(lease_id, secret, peer)

    server = ArenaServer(socket_path, slow, max_connections=6, grace=60.0)
    server.start()
    pending = [connect(socket_path) for _ in range(6)]
    try:
        for sock in pending:
            sock.sendall(json.dumps({"lease_id": "ok", "secret": SECRET}).encode() + b"\n")
        until(
            lambda: not server._conns and server._answering == 6,
            "the requests never reached the pool",
            10,
        )
        extra = connect(socket_path)
        extra.settimeout(10)
        assert json.loads(extra.recv(4096))["code"] == "busy"  # was accepted and queued
        extra.close()
        release.set()
        for sock in pending:
            sock.settimeout(10)
            assert json.loads(sock.recv(4096))["ok"] is True
        until(lambda: server._answering == 0, "the pool's count never went back to 0", 10)
        attach(socket_path)
    finally:
        release.set()
        for sock in pending:
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
    from service.serving.socket.server import ArenaServer
    from service.worker.socket import receive_arena

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

    from service.serving.socket.server import SocketUnsafe, resolve_group

    assert resolve_group(None) is None and resolve_group("") is None
    assert resolve_group("54322") == 54322
    root_group = grp.getgrgid(0).gr_name
    assert resolve_group(root_group) == 0
    with pytest.raises(SocketUnsafe, match="numeric gid"):
        resolve_group("no-such-group-basehold")


def test_a_peer_names_its_pid_or_another_pid_namespace() -> None:
    assert str(Peer(1234, 1000, 1001)) == "pid 1234 uid 1000 gid 1001"
    assert str(Peer(0, 1000, 1001)) == "another PID namespace uid 1000 gid 1001"


# A server in a PID namespace of its own: it cannot see its peers' pids (SO_PEERCRED says
# 0), as a basehold container cannot see workers in sibling containers.
NAMESPACED_SERVER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from service.serving.socket.server import ArenaServer

    memfd = os.memfd_create("basehold:test")
    os.write(memfd, b"arena")
    server = ArenaServer(
        Path(sys.argv[1]), lambda *_: [os.dup(memfd)], deadline=60.0, per_peer=4
    )
    server.start()
    print("serving", flush=True)
    sys.stdin.read()
    server.stop()
    """
)

# Opens `per` connections in each of `count` forked processes, sends nothing, says "held"
# once all are connected and keeps them until its stdin closes.
IDLE_PROCESSES = textwrap.dedent(
    """
    import os, socket, sys
    path, count, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    children = []
    for _ in range(count):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            held = []
            for _ in range(per):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                held.append(s)
            os.write(w, b"x")
            os.read(0, 1)  # until the parent's stdin closes
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"x"
        children.append(pid)
    print("held", flush=True)
    sys.stdin.read()
    for pid in children:
        os.waitpid(pid, 0)
    """
)


def idle_processes(path: Path, count: int, per: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", IDLE_PROCESSES, str(path), str(count), str(per)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root for a PID namespace of its own")
def test_an_idle_sibling_container_does_not_block_other_workers_of_its_uid(
    socket_path: Path,
) -> None:
    """Every peer is "another PID namespace" to the server, as workers in sibling
    containers are: one idle process holding its uid's connections must not turn away a
    worker of that uid in another container (it was told `busy` until the idle ones hit
    their 60 s deadline)."""
    server = subprocess.Popen(
        ["unshare", "--pid", "--fork", sys.executable, "-c", NAMESPACED_SERVER, str(socket_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "serving"
        idle = idle_processes(socket_path, 1, 4)  # as many as a peer may hold
        try:
            began = time.monotonic()
            fd = receive_arena(str(socket_path), "ok", SECRET, os.getuid(), timeout=20)
            try:
                assert os.pread(fd, 5, 0) == b"arena"
            finally:
                os.close(fd)
            assert time.monotonic() - began < 10  # not the idle ones' 60 s deadline
        finally:
            stop(idle)
    finally:
        stop(server)


def test_forty_idle_processes_do_not_block_a_worker(socket_path: Path, arena: Arena) -> None:
    """40 processes holding 16 idle connections each filled every slot (512): every
    worker was told `busy` until their deadline, and again as they reconnected."""
    server = serve(socket_path, arena, deadline=60.0)  # the default limits
    idle = idle_processes(socket_path, 40, 16)
    try:
        assert attach(socket_path) < 10  # not the idle ones' 60 s deadline
        assert server.serving
    finally:
        stop(idle)
        server.stop()


def test_refusals_are_logged_once_a_minute_with_a_count(
    socket_path: Path, arena: Arena, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refusal logged a line (~2.6 GB an hour under a reconnecting client): now the
    first of a minute is logged, and the next line says how many were left out."""
    server = serve(socket_path, arena, per_peer=1, grace=60.0)
    held = connect(socket_path)
    try:
        with caplog.at_level(logging.WARNING, "basehold.handles"):
            for _ in range(200):
                with connect(socket_path) as extra:
                    extra.settimeout(10)
                    assert json.loads(extra.recv(4096))["code"] == "busy"
            turned_away = [r for r in caplog.records if "turned away" in r.getMessage()]
            assert len(turned_away) == 1, len(turned_away)
            assert server.refused == 200
    finally:
        held.close()
        server.stop()


def test_the_lines_left_out_are_counted_when_the_minute_is_over(
    socket_path: Path, arena: Arena, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(socket_path, arena, per_peer=1, grace=60.0, log_every=0.5)
    held = connect(socket_path)
    try:
        with caplog.at_level(logging.WARNING, "basehold.handles"):
            for _ in range(30):
                with connect(socket_path) as extra:
                    extra.settimeout(10)
                    extra.recv(4096)
            until(lambda: "29 more" in caplog.text, "a line counting the 29 left out")
        assert len([r for r in caplog.records if "turned away" in r.getMessage()]) <= 2
    finally:
        held.close()
        server.stop()


def test_a_busy_worker_retries_until_a_slot_is_free(socket_path: Path, arena: Arena) -> None:
    server = serve(socket_path, arena, per_peer=1, grace=60.0)
    held = connect(socket_path)
    got: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            got.append(receive_arena(str(socket_path), "ok", SECRET, os.getuid(), timeout=30))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        until(lambda: server.refused >= 2 or errors, "the worker to be told busy twice")
        held.close()
        thread.join(timeout=30)
        assert errors == [] and len(got) == 1
        assert os.pread(got[0], 5, 0) == b"arena"
        os.close(got[0])
    finally:
        held.close()
        server.stop()
