"""The pre-imported template loaders fork from (`service.loaders.forker`): a process that
imported torch, transformers, accelerate and bitsandbytes once. Forking a loader from it
costs milliseconds; the serving process itself never imports them.

Each service starts its own template (a private socket in a 0700 folder; the template
exits with the service), or uses a running one named by BASEHOLD_LOADER_TEMPLATE (one
template for several instances of the same user on a node; the test suite shares one).
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from service.loaders.wire import ChannelClosed, recv_exactly

# The template's protocol (service.loaders.forker answers it): a request's header (the
# job's length), then the child's pid and, when it ends, its exit status.
HEADER = struct.Struct("!I")
STATUS = struct.Struct("!i")

# What the template imports before it forks anything: the loader side of every load, what
# every from_pretrained imports on first use (~1 s that each loader would pay again), the
# bitsandbytes integration, and the model code of common architectures. A module that is
# not there (an older transformers) is skipped. BASEHOLD_LOADER_PRELOAD adds more
# (comma-separated module names, e.g. your architectures' modeling modules).
PRELOAD = [
    "service.loaders.entry",
    "service.loading.child",
    "transformers.modeling_utils",
    "transformers.masking_utils",
    "transformers.integrations.bitsandbytes",
    "transformers.quantizers.quantizer_bnb_4bit",
    "transformers.quantizers.quantizer_bnb_8bit",
    *(
        f"transformers.models.{name}.modeling_{name}"
        for name in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "phi3",
            "gpt2",
            "bert",
            "t5",
        )
    ),
]


def preload() -> list[str]:
    extra = os.environ.get("BASEHOLD_LOADER_PRELOAD", "")
    return [*PRELOAD, *(name.strip() for name in extra.split(",") if name.strip())]


class TemplateUnavailable(RuntimeError):
    pass


def start(address: Path, *, owned: bool, log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Start a template listening on `address`; returns once it has imported everything.
    `owned`: it exits when this process closes its stdin (or dies)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # A loader is a fresh process: every buffer a load allocates is new memory to fault in
    # (a long-lived process reused its allocator's cache). Transparent huge pages for
    # torch's large CPU allocations make that 512x fewer faults (where THP is "madvise").
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    command = [sys.executable, "-m", "service.loaders.forker", "--listen", str(address)]
    process = subprocess.Popen(
        [*command, *(["--owned"] if owned else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != b"ready":
        process.kill()
        process.wait()
        raise TemplateUnavailable(f"the loader template exited ({process.returncode})")
    return process


class Template:
    def __init__(self, address: str | None = None) -> None:
        self._shared = address or None  # "" (an unset variable in some tools): none
        self._address: str | None = self._shared
        self._process: subprocess.Popen[bytes] | None = None
        self._folder: str | None = None
        self._lock = threading.Lock()

    def ensure(self) -> str:
        """The template's address, starting ours (and waiting for its imports) if needed."""
        with self._lock:
            if self._shared is not None:
                return self._shared
            if self._process is not None and self._process.poll() is None:
                assert self._address is not None
                return self._address
            self._folder = self._folder or tempfile.mkdtemp(prefix="basehold-template-")
            address = str(Path(self._folder) / "template.sock")
            Path(address).unlink(missing_ok=True)
            self._process = start(Path(address), owned=True)
            self._address = address
            return address

    def spawn(self, kind: str, job: Any, channel: socket.socket) -> tuple[int, socket.socket]:
        """Fork a loader running `kind` on `job`, talking over `channel` (passed to it);
        returns its pid and the connection its exit status will arrive on."""
        body = pickle.dumps((kind, job))
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.ensure())
            # The loader logs where we log: our stderr goes with the request.
            socket.send_fds(conn, [HEADER.pack(len(body))], [channel.fileno(), 2])
            conn.sendall(body)
            (pid,) = STATUS.unpack(recv_exactly(conn, STATUS.size))
        except ChannelClosed:
            conn.close()
            raise TemplateUnavailable("the loader template hung up") from None
        except BaseException:
            conn.close()
            raise
        return pid, conn

    def close(self) -> None:
        """Our template exits (its stdin closes); a shared one is left alone."""
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def read_status(conn: socket.socket) -> int:
    """The exit status the template sent; a template that went away counts as SIGKILL."""
    try:
        return int(STATUS.unpack(recv_exactly(conn, STATUS.size))[0])
    except (ChannelClosed, OSError):
        return -9
