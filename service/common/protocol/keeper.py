"""Where the serving process finds its keeper (`service.keeper`): the environment the
keeper starts it with. Stdlib only, as the keeper is."""

from __future__ import annotations

import os

FD_SETTING = "BASEHOLD_KEEPER_FD"  # the serving process's end of the keeper's socketpair
RESTARTS_SETTING = "BASEHOLD_KEEPER_RESTARTS"  # how many times the keeper started it again


def network_namespace() -> str:
    """/proc/self/ns/net's link: sockets are passed only within one network namespace."""
    return _namespace("net")


def pid_namespace() -> str:
    """/proc/self/ns/pid's link: runner processes are passed only within one PID namespace
    (a pod's processes end with it)."""
    return _namespace("pid")


def _namespace(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:  # no /proc: treat every process as in another namespace
        return f"unknown:{os.getpid()}"
