"""One service per state directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.common.private_dir import FileUnsafe, FolderUnsafe
from service.serving.state.lock import FILENAME, StateDirLocked, StateLock


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
        "import os, sys; from pathlib import Path; "
        "from service.serving.state.lock import StateLock; "
        f"StateLock(Path({str(tmp_path)!r})).acquire(); print('held', flush=True); "
        "os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9 and "held" in proc.stdout
    lock = StateLock(tmp_path)
    lock.acquire()
    lock.release()


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path.parent / f"{tmp_path.name}-victim.txt"
    victim.write_text("precious\n")
    (tmp_path / FILENAME).symlink_to(victim)
    with pytest.raises(FileUnsafe, match="symlink"):
        StateLock(tmp_path).acquire()
    assert victim.read_text() == "precious\n"
    victim.unlink()


def test_a_lock_path_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / FILENAME)
    with pytest.raises(FileUnsafe, match="not a regular file"):
        StateLock(tmp_path).acquire()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_state_dir_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(FolderUnsafe, match="writable by others"):
        StateLock(state).acquire()
    assert not (state / FILENAME).exists()


def test_a_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to give the folder away")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 4242, 4242)
    with pytest.raises(FolderUnsafe, match="belongs to uid 4242"):
        StateLock(state).acquire()


def test_a_symlinked_state_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(real)
    with pytest.raises(FolderUnsafe, match="not a directory"):
        StateLock(tmp_path / "state").acquire()


def test_a_state_dir_whose_parent_others_can_write_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o777)  # anyone could rename the state dir away and put theirs in its place
    state = parent / "state"
    with pytest.raises(FolderUnsafe, match=r"without the sticky bit.*BASEHOLD_STATE_DIR"):
        StateLock(state).acquire()
    assert not (state / FILENAME).exists()
    parent.chmod(0o1777)  # like /tmp: only an entry's owner may rename it
    lock = StateLock(state)
    lock.acquire()
    lock.release()


def test_a_state_dir_swapped_after_start_is_detected(tmp_path: Path) -> None:
    """The lock holds the folder it checked: a folder put in its place later (only its
    owner or root can, once the parent is checked) is told apart from it, and the lock
    file stays in the folder that was checked."""
    state = tmp_path / "state"
    lock = StateLock(state)
    lock.acquire()
    lock.verify()
    state.rename(tmp_path / "moved")
    state.mkdir(mode=0o700)
    with pytest.raises(FolderUnsafe, match="replaced"):
        lock.verify()
    assert (tmp_path / "moved" / FILENAME).read_text() == f"{os.getpid()}\n"
    assert not (state / FILENAME).exists()
    lock.release()
