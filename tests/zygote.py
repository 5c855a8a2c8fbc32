"""A pre-imported template that forks `basehold serve` processes for the tests.

A cold `python -m service serve` spends about a second importing its web stack before it
serves, and a worker 3-4 s importing torch and transformers; the e2e suite starts dozens.
The zygote imports them once; each server is then a fork of it running the real CLI entry
point (`service.cli.main(["serve", ...])`) with its own environment, working directory
and log.

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

import atexit
import ctypes
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from service.loader.imports import CudaInitialized, import_before_fork

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
REFUSED = 3  # a template's exit code when its imports initialized CUDA (as the loader's)
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
# Read when called, not at import (by torch.cuda.is_available): templates set it, the
# processes forked from them need not.
CALL_TIME = {"PYTORCH_NVML_BASED_CUDA_CHECK"}
TEMPLATE_ENV = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}


def _import_time(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME) and k not in CALL_TIME}


def _same_imports(env: dict[str, str], base: dict[str, str]) -> bool:
    return _import_time(env) == _import_time(base)


# -- the zygote process -------------------------------------------------------------------
# What each kind of template imports before it forks. Workers import the rest (trl,
# datasets) themselves: datasets starts a native thread at import, which a fork would lose.
# Nothing here may initialize CUDA (a worker forked after it could not use CUDA): no
# bitsandbytes, nor peft or transformers.integrations.bitsandbytes, which import it (it
# asks the GPUs' capability at import); workers import them after the fork, which
# torch._inductor.compile_fx, most of bitsandbytes' import, makes ~0.1 s.
MODEL_CODE = (  # what a worker's first attach imports: the test checkpoints' classes
    "transformers.models.llama.modeling_llama",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.t5.modeling_t5",
    "transformers.models.bert.modeling_bert",
    "transformers.quantizers.quantizer_bnb_4bit",
    "transformers.quantizers.quantizer_bnb_8bit",
)
PRELOAD = {
    # The serving process imports no torch: its loaders fork from their own template.
    "serve": ("service.serving.app", "service.serving.server", "service.cli"),
    "worker": (
        *MODEL_CODE,
        "torch",
        "transformers",
        "torch._inductor.compile_fx",
        "safetensors.torch",
        "service.worker.client",
        "tests.reference",
        "tests.worker.worker",
    ),
}


def _stdio(request: dict[str, Any], fds: list[int]) -> None:
    """fds 0-2 of the new process: the three the test sent, or /dev/null and the log."""
    if fds:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
    else:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
    # Fresh stream objects over the new fds, buffered as a new interpreter's would be.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    for name in ("stdin", "stdout", "stderr"):
        setattr(sys, f"__{name}__", getattr(sys, name))


def _run(request: dict[str, Any], fds: list[int]) -> None:
    """In the grandchild: become the requested program and exit with its code."""
    code = 1
    try:
        _stdio(request, fds)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython sets it at start
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        if "module" in request:  # python -m MODULE ARGV...
            sys.argv = [request["module"], *request["argv"]]
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        elif "path" in request:  # python PATH ARGV...: its folder first on sys.path
            sys.argv = [request["path"], *request["argv"]]
            sys.path.insert(0, str(Path(request["path"]).parent))
            runpy.run_path(request["path"], run_name="__main__")
            code = 0
        else:
            sys.argv = ["basehold", *request["argv"]]
            from service.cli import main

            code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        import logging

        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _spawn(request: dict[str, Any], fds: list[int], inherited: list[socket.socket]) -> int:
    """Double fork; returns the grandchild's pid (reparented to the subreaper)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        for sock in inherited:
            sock.close()
        grandchild = os.fork()
        if grandchild == 0:
            os.close(write)
            _run(request, fds)
        os.write(write, str(grandchild).encode())
        os._exit(0)
    os.close(write)
    for fd in fds:
        os.close(fd)
    with os.fdopen(read) as fh:
        pid = int(fh.read())
    os.waitpid(child, 0)
    return pid


def serve_forever(path: str, kind: str) -> int:
    # Die with the test process, however it ends (forked servers do not inherit this).
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        missing = import_before_fork(list(PRELOAD[kind]))
    except CudaInitialized as exc:  # what it forked could not use CUDA
        print(f"zygote: importing {exc.module} initialized CUDA; not forking", flush=True)
        return REFUSED
    if missing:
        raise ImportError(f"zygote: cannot import {', '.join(missing)}")
    if kind == "serve":
        from service.cli import build_parser

        build_parser()
    if threading.active_count() != 1:
        print(f"zygote: {threading.active_count()} threads after imports; not forking", flush=True)
        return 1
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
            if not data:
                continue
            try:
                pid = _spawn(json.loads(data), fds, [listener, conn])
                answer: dict[str, Any] = {"pid": pid}
            except Exception as exc:  # a bad request: say so, keep serving
                answer = {"error": repr(exc)}
            conn.sendall(json.dumps(answer).encode())


# -- the test process ---------------------------------------------------------------------
class Forked:
    """A process forked by a zygote and reparented to this process: `pid`, `poll`, `wait`,
    `kill`, `send_signal`, `returncode`, and for workers `stdin`/`stdout`/`stderr` and
    `communicate`, as `subprocess.Popen` has them (text mode)."""

    def __init__(self, pid: int, pipes: tuple[Any, Any, Any] = (None, None, None)) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdin, self.stdout, self.stderr = pipes

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
                raise subprocess.TimeoutExpired([str(self.pid)], timeout or 0)
            time.sleep(0.02)
        return code

    def communicate(
        self, input: str | None = None, timeout: float | None = None
    ) -> tuple[str, str]:
        """Send `input`, close stdin, read stdout and stderr to the end, wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        read: dict[str, str] = {}
        readers = [
            threading.Thread(target=lambda n=name, s=stream: read.update({n: s.read()}))
            for name, stream in (("out", self.stdout), ("err", self.stderr))
            if stream is not None
        ]
        for reader in readers:
            reader.daemon = True
            reader.start()
        if self.stdin is not None:
            try:
                if input:
                    self.stdin.write(input)
                self.stdin.close()
            except BrokenPipeError:
                pass
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired([str(self.pid)], timeout or 0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return read.get("out", ""), read.get("err", "")

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    """One template process of a `kind` (PRELOAD) that imports under `env`, started on
    first use."""

    def __init__(self, kind: str, env: dict[str, str]) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._path = ""
        self._env = dict(env)
        self._broken = False
        self._ready = False

    def _launch(self) -> bool:
        """Start the process (it then imports for a few seconds); False if this process
        cannot be the subreaper its forks need."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return False
        folder = Path(f"/tmp/bh-zygote-{os.getpid()}")
        folder.mkdir(mode=0o700, exist_ok=True)
        self._path = str(folder / f"{self.kind}-{id(self)}.sock")
        Path(self._path).unlink(missing_ok=True)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", self._path, self.kind],
            cwd=ROOT,
            env={**self._env, **TEMPLATE_ENV},
            stdout=subprocess.PIPE,
            text=True,
        )
        return True

    def warm(self) -> None:
        """Start the template now, without waiting for its imports (~6 s): the caller
        overlaps them with other work. Call it from the main thread: the template dies with
        the thread that started it (PR_SET_PDEATHSIG)."""
        with self._lock:
            if self._proc is None and not self._broken and not self._launch():
                self._broken = True

    def _serving(self) -> bool:
        """Start the template if it is not, wait until it serves; whether it does."""
        with self._lock:
            if self._broken:
                return False
            if self._proc is None and not self._launch():
                self._broken = True
                return False
            if not self._ready:
                assert self._proc is not None and self._proc.stdout is not None
                self._ready = self._proc.stdout.readline().strip() == "ready"
                self._broken = not self._ready
            return self._ready

    def _request(self, request: dict[str, Any], fds: list[int]) -> int | None:
        if not self._serving():
            return None
        if not _same_imports(request["env"], self._env):
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.connect(self._path)
            socket.send_fds(conn, [json.dumps(request).encode()], fds)
            answer = json.loads(conn.recv(1 << 16))
        if "pid" not in answer:
            raise RuntimeError(f"the {self.kind} zygote could not fork: {answer}")
        return int(answer["pid"])

    def spawn(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Forked | None:
        """A forked `basehold ARGV`, or None when this request needs a cold start."""
        request = {"argv": argv, "env": env, "cwd": str(cwd), "log": str(log)}
        pid = self._request(request, [])
        return None if pid is None else Forked(pid)

    def run_module(
        self, module: str, argv: list[str], env: dict[str, str], cwd: Path, quiet: bool = False
    ) -> Forked | None:
        """A forked `python -m MODULE ARGV` (or `python MODULE ARGV` when `module` ends in
        .py) with pipes for stdin, stdout and stderr (or /dev/null for the output when
        `quiet`), or None when it needs a cold start."""
        stdin_r, stdin_w = os.pipe()
        if quiet:
            out_r = err_r = -1
            out_w = err_w = os.open(os.devnull, os.O_WRONLY)
        else:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
        theirs = [stdin_r, out_w, err_w]
        pid = None
        try:
            what = "path" if module.endswith(".py") else "module"
            request = {what: module, "argv": argv, "env": env, "cwd": str(cwd)}
            pid = self._request(request, theirs)
        finally:
            for fd in {*theirs}:
                os.close(fd)
            if pid is None:  # a cold start instead, or the request failed
                for fd in (stdin_w, out_r, err_r):
                    if fd >= 0:
                        os.close(fd)
        if pid is None:
            return None
        pipes = (
            open(stdin_w, "w"),  # noqa: SIM115 (they live as long as the process)
            None if quiet else open(out_r),  # noqa: SIM115
            None if quiet else open(err_r),  # noqa: SIM115
        )
        return Forked(pid, pipes)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            Path(self._path).unlink(missing_ok=True)


ROOT = Path(__file__).resolve().parent.parent
# The environment the test session started with (before any test changed it): the
# zygotes import the libraries under it.
SESSION_ENV = dict(os.environ)
ZYGOTE = Zygote("serve", SESSION_ENV)
_WORKER_TEMPLATES: dict[tuple[tuple[str, str], ...], Zygote] = {}
_TEMPLATES_LOCK = threading.Lock()


def worker_template(env: dict[str, str]) -> Zygote | None:
    """The worker template that imports under `env`'s import-time variables (at most
    three different ones a session; None past that: start cold)."""
    key = tuple(sorted(_import_time(env).items()))
    with _TEMPLATES_LOCK:
        if key not in _WORKER_TEMPLATES:
            if len(_WORKER_TEMPLATES) >= 3:
                return None
            _WORKER_TEMPLATES[key] = Zygote("worker", env)
        return _WORKER_TEMPLATES[key]


def close_all() -> None:
    ZYGOTE.close()
    for template in _WORKER_TEMPLATES.values():
        template.close()


if __name__ == "__main__":
    sys.exit(serve_forever(sys.argv[1], sys.argv[2]))
