"""A module for BASEHOLD_LOADER_PRELOAD in tests of the template's background preload
(tests/serving/loaders/test_background_preload.py): imported in the template once it
serves, its import returns only once a request waits on the template's socket, so the
background preload cannot end before a loader was asked for once the gate waits. It
writes that it waits, then which ended the wait (a request, or its deadline), to the file
BH_TEST_PRELOAD_LOG names."""

from __future__ import annotations

import gc
import os
import select
import socket

DEADLINE = 120.0  # a test that never asks gives up


def _listener() -> socket.socket | None:
    """The template's listening socket (this runs inside the template)."""
    for thing in gc.get_objects():
        if type(thing) is socket.socket and thing.fileno() >= 0:
            try:
                listening = thing.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            except OSError:
                continue
            if listening and thing.family == socket.AF_UNIX:
                return thing
    return None


def _wait() -> str:
    listener = _listener()
    if listener is None:
        return "no listening socket"
    _say("gate waiting")
    if select.select([listener], [], [], DEADLINE)[0]:
        return "a request"
    return "its deadline"


def _say(line: str) -> None:
    with open(os.environ["BH_TEST_PRELOAD_LOG"], "a") as log:
        log.write(line + "\n")


_say(f"gate opened by {_wait()}")
