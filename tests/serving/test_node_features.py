"""The Node Feature Discovery feature file: label-safe names, and a file that follows the
registry (ready shareable models only) and goes away at shutdown."""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from service.common.load.spec import LoadRequest, Task
from service.common.private_dir import FolderUnsafe
from service.common.protocol.held import Held, Placed
from service.serving.app import create_app
from service.serving.node_features import NodeFeatures, label_name
from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State
from service.serving.settings import Settings
from service.serving.state.writer import OrderedWriter
from tests.conftest import load

LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


def test_label_safe_ids_are_kept_and_the_rest_are_made_safe() -> None:
    assert label_name("llama-q4") == "basehold-model.llama-q4"
    assert label_name("Llama_3.1") == "basehold-model.Llama_3.1"
    made = label_name("meta-llama/Llama-3.1-8B")
    assert made.startswith("basehold-model.meta-llama-Llama-3.1-8B-") and len(made) <= 63
    assert label_name("a/b") != label_name("a-b")  # replaced characters never collide
    long = "x" * 100
    assert len(label_name(long)) == 63 and label_name(long) != label_name("x" * 99)


@given(st.text(min_size=1, max_size=300))
def test_every_label_is_a_valid_kubernetes_label_name(model_id: str) -> None:
    name = label_name(model_id)
    assert len(name) <= 63 and LABEL.match(name), name


def features(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_the_file_lists_ready_shareable_models_and_goes_at_shutdown(
    models_root: Path, tmp_path: Path, socket_path: Path
) -> None:
    path = tmp_path / "features.d" / "basehold"
    path.parent.mkdir()
    settings = Settings(
        state_dir=tmp_path / "state",
        socket=socket_path,
        model_roots=[models_root],
        node_features_file=path,
    )
    long_name = "a-very-long-model-name-that-does-not-fit-in-a-kubernetes-label"
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        assert features(path) == ["basehold.ready=true"]
        load(client, source=str(models_root / "gpt2"), name=long_name)
        eight = {"method": "bnb-8bit"}
        load(client, source=str(models_root / "llama"), name="eight", quantization=eight)
        assert features(path) == ["basehold.ready=true", f"{label_name(long_name)}=ready"]
        assert len(label_name(long_name)) == 63
        assert oct(path.stat().st_mode & 0o777) == "0o644"
        assert client.delete(f"/v1/models/{long_name}").status_code == 204
        assert features(path) == ["basehold.ready=true"]
        load(client, source=str(models_root / "llama"), name="kept", dtype="float32")
        assert features(path) == ["basehold.ready=true", "basehold-model.kept=ready"]
    assert not path.exists()  # the service stopped: its labels go
    assert list(path.parent.iterdir()) == []  # and no temporary file is left behind


def written(path: Path) -> NodeFeatures:
    """A started NodeFeatures on `path` (the service is up: the file says so)."""
    nfd = NodeFeatures(path, OrderedWriter())
    nfd.start()
    return nfd


def test_a_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    """A group member once could write the folder: their symlinks, at the file's name and
    at the temporary name the old code used, point at the service's HF token. Neither is
    followed: the token keeps its bytes and its 0600, and the file is a file of its own."""
    folder = tmp_path / "features.d"
    folder.mkdir(mode=0o755)
    token = tmp_path / "hf-token"
    token.write_bytes(b"hf_secret\n")
    token.chmod(0o600)
    path = folder / "basehold"
    path.symlink_to(token)
    (folder / f".basehold.{os.getpid()}.tmp").symlink_to(token)
    old = os.umask(0o077)  # the mode is set on the fd, whatever the umask
    try:
        nfd = written(path)
    finally:
        os.umask(old)
    assert token.read_bytes() == b"hf_secret\n"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert not path.is_symlink() and features(path) == ["basehold.ready=true"]
    assert stat.S_IMODE(path.lstat().st_mode) == 0o644  # NFD's worker reads it as another user
    nfd.stop()
    assert not path.exists() and token.read_bytes() == b"hf_secret\n"
    assert list(folder.iterdir()) == []  # the planted temporary symlink is cleared too


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_a_folder_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "features.d"
    folder.mkdir()
    folder.chmod(mode)  # the old reference DaemonSet made it 0775 for the socket group
    with pytest.raises(FolderUnsafe, match=r"writable by others.*BASEHOLD_NODE_FEATURES_FILE"):
        written(folder / "basehold")
    assert list(folder.iterdir()) == []
    settings = Settings(
        state_dir=tmp_path / "state",
        socket=tmp_path / "socket" / "basehold.sock",
        node_features_file=folder / "basehold",
    )
    with pytest.raises(FolderUnsafe, match="writable by others"):
        create_app(settings)  # refused before anything starts


def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to give the folder away")
    folder = tmp_path / "features.d"
    folder.mkdir(mode=0o755)
    os.chown(folder, 4242, 4242)
    with pytest.raises(FolderUnsafe, match="belongs to uid 4242"):
        written(folder / "basehold")


def test_a_folder_made_unsafe_after_start_gets_no_more_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "features.d"
    folder.mkdir(mode=0o755)
    path = folder / "basehold"
    nfd = written(path)
    folder.chmod(0o775)
    held = Held(
        task=Task.CAUSAL_LM,
        architecture="LlamaForCausalLM",
        dtype="float32",
        parameters=1,
        resolved_revision=None,
        by_device={"cpu": 1},
        device_map={"": "cpu"},
        placed=Placed(shareable=True),
        checkpoint=tmp_path,
        allowed=(tmp_path,),
    )
    record = ModelRecord(id="m", name=None, spec=LoadRequest(source="/m"), key="k", loaded=held)
    with caplog.at_level(logging.WARNING, "basehold.node_features"):
        nfd.on_transition(record, State.LOADING, State.READY)
    assert features(path) == ["basehold.ready=true"]  # not rewritten
    assert "writable by others" in caplog.text
    folder.chmod(0o755)
    nfd.stop()


def test_basehold_serve_refuses_an_unsafe_features_folder_with_one_line(tmp_path: Path) -> None:
    import tempfile

    from tests.spawn import run_basehold

    folder = tmp_path / "features.d"
    folder.mkdir()
    folder.chmod(0o775)  # group-writable: a group member could plant or read the file
    env = {
        **os.environ,
        "BASEHOLD_STATE_DIR": str(tmp_path / "state"),
        "BASEHOLD_SOCKET": str(Path(tempfile.mkdtemp(prefix="bh-s-")) / "s.sock"),
        "BASEHOLD_NODE_FEATURES_FILE": str(folder / "basehold"),
    }
    result = run_basehold(["serve", "--port", "1"], env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr and str(folder) in result.stderr
    assert "Traceback" not in result.stderr
