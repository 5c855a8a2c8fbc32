"""One service per state directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.state.lock import StateDirLocked, StateLock


def test_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    first = StateLock(tmp_path)
    first.acquire()
    with pytest.raises(StateDirLocked, match=f"pid {os.getpid()}"):
        StateLock(tmp_path).acquire()
    first.release()
    second = StateLock(tmp_path)
    second.acquire()
    second.release()


def test_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    code = (
        "import os, sys; from pathlib import Path; from service.state.lock import StateLock; "
        f"StateLock(Path({str(tmp_path)!r})).acquire(); print('held', flush=True); "
        "os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9 and "held" in proc.stdout
    lock = StateLock(tmp_path)
    lock.acquire()
    lock.release()
