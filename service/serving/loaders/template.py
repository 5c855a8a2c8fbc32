"""The pre-imported template loaders fork from (`service.loader.forker`), seen from the
serving process: start one, check one, and ask one for a loader.

A template imported torch, transformers and accelerate once: forking a loader from it
costs milliseconds; the serving process itself never imports them. Each service starts
its own (a private socket in a 0700 folder; it exits with the service), or uses a running
one named by BASEHOLD_LOADER_TEMPLATE (one template for several instances of the same user
on a node; the test suite shares one). A template whose imports initialized CUDA refuses
to serve (`refused: WHY` instead of `ready`: `start` raises TemplateUnavailable with why;
or after it, when an import it does once it serves did: `said` and `refusal` read it).

A template gets every load's job, with its hub token, and hands back what workers map: it
is trusted only once checked. Its socket's folder must be this user's alone, the process
at the other end of every connection must run as this uid (SO_PEERCRED, checked before a
byte is sent), and it must answer the handshake in this loader protocol's version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from service.common.private_dir import FolderUnsafe, check_private
from service.common.protocol.job import Job
from service.common.protocol.messages import (
    FROM_TEMPLATE,
    PROTOCOL_VERSION,
    REPLY_SECONDS,
    Hello,
    Kind,
    Refused,
    Spawn,
    Spawned,
)
from service.common.protocol.wire import (
    BadMessage,
    Channel,
    ChannelClosed,
    ChannelTimeout,
    close_fds,
)
from service.common.socket_protocol import peer_credentials

log = logging.getLogger("basehold.loaders")

SETTING = "BASEHOLD_LOADER_TEMPLATE"
REFUSED = "refused:"  # what a template says instead of `ready` when it will not serve
START_SECONDS = 300.0  # imports on a cold disk; a template that takes longer is stuck


class TemplateUnavailable(RuntimeError):
    """No template answers now (not running, exited, or too slow): a retry may find one."""


class TemplateRefused(FolderUnsafe):
    """A template that must not be trusted (another uid serves it, others can write its
    folder, or it speaks another protocol version); the message says what to change."""


def start(
    address: Path,
    *,
    owned: bool,
    log: IO[bytes] | None = None,
    timeout: float = START_SECONDS,
    all_first: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a template listening on `address`; returns once it has imported what every
    load needs (TemplateUnavailable if it exits first or takes over `timeout` seconds).
    `owned`: it exits when this process closes its stdin (or dies). `all_first`: it imports
    its whole preload before it serves (not the rest while idle)."""
    process = launch(address, owned=owned, log=log, all_first=all_first)
    await_ready(process, timeout)
    return process


def launch(
    address: Path, *, owned: bool, log: IO[bytes] | None = None, all_first: bool = False
) -> subprocess.Popen[bytes]:
    """Start a template listening on `address`, without waiting for it (`await_ready`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # A loader is a fresh process: every buffer a load allocates is new memory to fault in
    # (a long-lived process reused its allocator's cache). Transparent huge pages for
    # torch's large CPU allocations make that 512x fewer faults (where THP is "madvise").
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # torch.cuda.is_available() in the template asks NVML, not the CUDA driver: a driver
    # initialized before the fork is unusable in every loader forked after it.
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    # Placing a GPU model frees each source tensor as it is copied into its segment
    # (service.loader.segment_fill): expandable segments hand freed pages back at once,
    # where torch's default caching allocator may keep a whole block until all of it is free.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    command = [sys.executable, "-m", "service.loader.forker", "--listen", str(address)]
    flags = [*(["--owned"] if owned else []), *(["--all-first"] if all_first else [])]
    return subprocess.Popen(
        [*command, *flags],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
    )


def await_ready(process: subprocess.Popen[bytes], timeout: float = START_SECONDS) -> None:
    """Wait for a launched template's `ready` line (TemplateUnavailable, and it is ended,
    if it exits first, refuses, or takes over `timeout` seconds)."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
            end(process)
            raise TemplateUnavailable(f"the loader template did not start in {timeout:g} s")
        chunk = os.read(process.stdout.fileno(), 64)
        if not chunk:
            break
        line += chunk
    if line.strip() != b"ready":
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)  # it exits: say how
        end(process)
        said = line.decode(errors="replace").strip()
        if said.startswith(REFUSED):  # its imports initialized CUDA: it says which
            raise TemplateUnavailable(said.removeprefix(REFUSED).strip())
        raise TemplateUnavailable(
            f"the loader template exited while starting ({_exit_words(process.returncode)}); "
            "see the server log"
        )


def said(process: subprocess.Popen[bytes]) -> Iterator[str]:
    """What a template that serves says on its stdout (a line at a time, until it exits):
    `refused: WHY` when an import it did once it served initialized CUDA (`refusal`)."""
    if process.stdout is None:
        return
    for line in process.stdout:
        yield line.decode(errors="replace").strip()


def refusal(line: str) -> str | None:
    """Why, when `line` is a template's refusal to serve."""
    return line.removeprefix(REFUSED).strip() if line.startswith(REFUSED) else None


def end(process: subprocess.Popen[bytes]) -> None:
    """Kill a template (one that is not ready yet does not read its stdin)."""
    process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()


def _exit_words(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def check_folder(address: str) -> None:
    """The folder of a shared template's socket: this user's, and no one else can write
    it (else someone could put their own template in its place)."""
    try:
        check_private(Path(address).parent, SETTING, create=False)
    except FileNotFoundError:
        raise TemplateUnavailable(f"the folder of {address} does not exist") from None
    except FolderUnsafe as exc:
        raise TemplateRefused(str(exc)) from None


def check_template(address: str | None, timeout: float = REPLY_SECONDS) -> None:
    """At start: refuse a shared template that cannot be trusted (TemplateRefused). One that
    is not there yet passes: loads fail `loader_unavailable` until it answers."""
    if not address:
        return
    try:
        check_folder(address)
        connect(address, timeout).close()
    except TemplateUnavailable as exc:
        log.warning(
            "the shared loader template does not answer yet (%s); loads fail until it does", exc
        )


def connect(address: str, timeout: float, *, watch: bool = False) -> Channel:
    """A connection to the template at `address` that passed the checks: served by this
    uid (before anything is sent) and answering the handshake in this protocol."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except TimeoutError:
            raise TemplateUnavailable(
                f"{address} did not take the connection in {timeout:g} s"
            ) from None
        except OSError as exc:
            raise TemplateUnavailable(f"nothing serves {address} ({exc.strerror})") from None
        sock.settimeout(None)
        _, uid, _ = peer_credentials(sock)
        if uid != os.getuid():
            raise TemplateRefused(
                f"{address} ({SETTING}) is served by uid {uid}, not by this service's uid "
                f"({os.getuid()}): a template of another user would get every load's job and "
                "hub token and hand workers what it likes. Start the template as this user, "
                f"or unset {SETTING}."
            )
        channel = Channel(sock)
        channel.send(Hello(protocol=PROTOCOL_VERSION, watch=watch))
        hello, fds = channel.receive(FROM_TEMPLATE, timeout)
        close_fds(fds)
    except ChannelTimeout:
        sock.close()
        raise TemplateUnavailable(
            f"{address} did not answer the handshake in {timeout:g} s"
        ) from None
    except (ChannelClosed, BadMessage) as exc:
        sock.close()
        raise TemplateRefused(
            f"{address} ({SETTING}) did not answer the handshake of loader protocol "
            f"{PROTOCOL_VERSION} ({exc}): it is not a template of this version of basehold. "
            f"Restart it from this version (python -m service.loader.forker --listen "
            f"{address}), or unset {SETTING}."
        ) from None
    except BaseException:
        sock.close()
        raise
    if not isinstance(hello, Hello) or hello.protocol != PROTOCOL_VERSION:
        channel.close()
        spoken = f"protocol {hello.protocol}" if isinstance(hello, Hello) else hello.type
        raise TemplateRefused(
            f"{address} ({SETTING}) speaks loader {spoken}; this service speaks protocol "
            f"{PROTOCOL_VERSION}. Restart the template from this version of basehold "
            f"(python -m service.loader.forker --listen {address}), or unset {SETTING}."
        )
    return channel


def spawn(
    address: str, kind: Kind, job: Job, channel: socket.socket, timeout: float
) -> tuple[int, Channel]:
    """Fork a loader running `kind` on `job` that talks over `channel` (passed to it, with
    our stderr: the loader logs where we log). Returns its pid and the connection its exit
    status comes on."""
    conn = connect(address, timeout)
    try:
        conn.send(Spawn(kind=kind, job=job), [channel.fileno(), 2])
        reply, fds = conn.receive(FROM_TEMPLATE, timeout)
        close_fds(fds)
    except ChannelTimeout:
        conn.close()
        raise TemplateUnavailable(
            f"the loader template did not answer a spawn in {timeout:g} s"
        ) from None
    except (ChannelClosed, BadMessage) as exc:
        conn.close()
        raise TemplateUnavailable(f"the loader template failed a spawn ({exc})") from None
    except BaseException:
        conn.close()
        raise
    if isinstance(reply, Spawned):
        return reply.pid, conn
    conn.close()
    why = reply.reason if isinstance(reply, Refused) else f"it answered {reply.type}"
    raise TemplateUnavailable(f"the loader template did not fork the loader: {why}")
