"""SIGHUP: hand over to a fresh copy of the installed basehold (an upgrade after
`pip install -U`; files its settings point to are read again, its environment is this
process's) without loading anything again.

The running process starts `python -m service serve ... --take-over` as its child, with
its own arguments and environment; the child builds its app, then takes the sockets,
models and leases over the handover socket, and this process exits once it handed over.
Under systemd (`Type=notify`, `NotifyAccess=all`, `ExecReload=/bin/kill -HUP $MAINPID`)
the successor tells systemd it is the main process now (`MAINPID=`, `READY=1` on
`NOTIFY_SOCKET`). As PID 1 of a container, where exiting would end the container, this
process stays as the successor's parent instead: it passes on SIGTERM, SIGINT and SIGHUP,
reaps orphans, and exits with the successor's status.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from types import FrameType

log = logging.getLogger("basehold")

DROPPED = frozenset({"--take-over", "--demo"})  # the successor takes over; no demo again


def successor_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "service", *(a for a in argv if a not in DROPPED), "--take-over"]


class Reloader:
    """`keeper`: this process runs under a keeper (`serve --keeper`), which starts the
    successor as its own child: SIGHUP goes to it."""

    def __init__(self, argv: list[str], *, keeper: bool = False) -> None:
        self.argv = argv
        self.keeper = keeper
        self.child: subprocess.Popen[bytes] | None = None

    def install(self) -> None:
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        if self.keeper:
            os.kill(os.getppid(), signal.SIGHUP)
            return
        if self.child is not None and self.child.poll() is None:
            log.warning("SIGHUP: a successor (pid %d) is starting already", self.child.pid)
            return
        command = successor_command(self.argv)
        self.child = subprocess.Popen(command)
        log.info("SIGHUP: started pid %d to take over: %s", self.child.pid, " ".join(command))

    def stay_as_parent(self) -> int | None:
        """After a handover as PID 1: wait for the successor (its exit status), passing
        on the signals a container gets and reaping orphans. None: nothing to wait for."""
        child = self.child
        if child is None or os.getpid() != 1 or child.poll() is not None:
            return None

        def forward(signum: int, frame: FrameType | None) -> None:
            if child.poll() is None:
                child.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        log.info("handed over to pid %d; staying as its parent (PID 1)", child.pid)
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                return child.returncode or 0
            if pid == child.pid:
                return os.waitstatus_to_exitcode(status)


def notify_systemd(**fields: object) -> bool:
    """Send `fields` to systemd's NOTIFY_SOCKET (False: not run by systemd)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message, address)
        except OSError as exc:
            log.warning("could not notify systemd on %s: %s", address, exc)
            return False
    return True
