"""A pre-imported template that forks `basehold serve` processes for the tests.

A cold `python -m service serve` spends 3-4 s importing torch, transformers, accelerate
and bitsandbytes before it serves; the e2e suite starts dozens. The zygote imports them
once; each server is then a fork of it running the real CLI entry point
(`service.cli.main(["serve", ...])`) with its own environment, working directory and log.

Each server is double-forked, so it is reparented to the test process, which makes itself
a child subreaper (PR_SET_CHILD_SUBREAPER): it can wait for, signal and reap the server
like any child of its own (`Forked` mirrors the parts of `subprocess.Popen` the tests use).

What a fork cannot change is read at import time: the zygote serves a request only when
its environment agrees with the zygote's in every variable read then (`IMPORT_TIME`:
`HF_HUB_OFFLINE`, `TORCH_*`, ...); otherwise the server starts cold. Nothing here
replaces what is tested: the server is the same code from the same entry point; a few
tests still start cold processes on purpose (`python -m service`, a second instance, a
limited address space).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
# Variables the imported libraries (or the interpreter) read once, at import or start: a
# server whose environment differs from the zygote's in any of them starts cold. The rest
# (BASEHOLD_*, paths, XDG_*, ...) are read when the server runs, from its own environment.
IMPORT_TIME = (
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS",
    "TOKENIZERS",
    "ACCELERATE",
    "BNB_",
    "BITSANDBYTES",
    "TORCH",
    "PYTORCH",
    "CUDA",
    "NVIDIA",
    "OMP_",
    "MKL_",
    "OPENBLAS",
    "PYTHON",
    "LD_",
)


def _same_imports(env: dict[str, str], base: dict[str, str]) -> bool:
    keys = {k for k in set(env) | set(base) if k.startswith(IMPORT_TIME)}
    return all(env.get(k) == base.get(k) for k in keys)


# -- the zygote process -------------------------------------------------------------------
def _run_server(request: dict[str, Any]) -> None:
    """In the grandchild: become the requested `basehold serve` and exit with its code."""
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython sets it at start
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["basehold", *request["argv"]]
        from service.cli import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _spawn(request: dict[str, Any]) -> int:
    """Double fork; returns the grandchild's pid (reparented to the subreaper)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        grandchild = os.fork()
        if grandchild == 0:
            os.close(write)
            _run_server(request)
        os.write(write, str(grandchild).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        pid = int(fh.read())
    os.waitpid(child, 0)
    return pid


def serve_forever(path: str) -> None:
    # Die with the test process, however it ends (forked servers do not inherit this).
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    import service.app
    import service.server  # noqa: F401
    from service.cli import build_parser

    build_parser()
    if threading.active_count() != 1:
        print(f"zygote: {threading.active_count()} threads after imports; not forking", flush=True)
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("rw") as stream:
            line = stream.readline()
            if not line:
                continue
            try:
                pid = _spawn(json.loads(line))
                stream.write(json.dumps({"pid": pid}) + "\n")
            except Exception as exc:  # a bad request: say so, keep serving
                stream.write(json.dumps({"error": repr(exc)}) + "\n")
            stream.flush()


# -- the test process ---------------------------------------------------------------------
class Forked:
    """A server forked by the zygote and reparented to this process: `pid`, `poll`,
    `wait`, `kill`, `send_signal` and `returncode`, as `subprocess.Popen` has them."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reaped(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reaped(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["basehold", "serve"], timeout or 0)
            time.sleep(0.02)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._path = ""
        self._env: dict[str, str] = {}
        self._broken = False

    def _start(self) -> bool:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return False
        folder = Path(f"/tmp/bh-zygote-{os.getpid()}")
        folder.mkdir(mode=0o700, exist_ok=True)
        self._path = str(folder / "z.sock")
        Path(self._path).unlink(missing_ok=True)
        self._env = dict(SESSION_ENV)
        root = Path(__file__).resolve().parent.parent
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", self._path],
            cwd=root,
            env=self._env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        return self._proc.stdout.readline().strip() == "ready"

    def spawn(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Forked | None:
        """A forked server, or None when this request needs a cold start."""
        with self._lock:
            if self._broken:
                return None
            if self._proc is None and not self._start():
                self._broken = True
                return None
        if not _same_imports(env, self._env):
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self._path)
            request = {"argv": argv, "env": env, "cwd": str(cwd), "log": str(log)}
            conn.sendall((json.dumps(request) + "\n").encode())
            answer = json.loads(conn.makefile().readline())
        if "pid" not in answer:
            raise RuntimeError(f"the zygote could not fork a server: {answer}")
        return Forked(int(answer["pid"]))

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            Path(self._path).unlink(missing_ok=True)


# The environment the test session started with (before any test changed it): the
# zygote imports the libraries under it.
SESSION_ENV = dict(os.environ)
ZYGOTE = Zygote()

if __name__ == "__main__":
    serve_forever(sys.argv[1])
