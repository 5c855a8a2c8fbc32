"""Snapshots, for real: `basehold serve` writes a held model's arena to its state directory,
and a start after a SIGKILL holds it again from there, without a loader; anything that no
longer agrees is loaded again."""

from __future__ import annotations

import json
import os
import resource
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from service.serving.state.snapshots import FOLDER, Snapshots
from service.worker.client import Client
from tests.common.handles.arenas import arena_fds, sha256
from tests.conftest import until
from tests.reference import from_pretrained
from tests.serving.state.test_restart import TOKENS, env_for, post, restart
from tests.serving.test_server_e2e import Server, start, wait_ready

pytestmark = pytest.mark.e2e

NF4: dict[str, Any] = {
    "dtype": "float32",
    "quantization": {"method": "bnb-4bit", "quant_type": "nf4"},
}


@pytest.fixture
def own_root(tmp_path: Path, models_root: Path) -> Path:
    """Two copies of the session's Llama that a test may change."""
    root = tmp_path / "models"
    for name in ("llama", "llama-2"):
        shutil.copytree(models_root / "llama", root / name)
    return root


def snapshot(tmp_path: Path, model_id: str) -> Path:
    return tmp_path / "state" / FOLDER / f"{model_id}.arena"


def written(tmp_path: Path, *model_ids: str) -> None:
    """Wait until the snapshots of `model_ids` are on disk (written once they are ready)."""
    folder = tmp_path / "state" / FOLDER
    until(
        lambda: all((folder / f"{m}.json").exists() for m in model_ids),
        f"snapshots of {model_ids} written",
    )


def arena_hashes(server: Server) -> dict[str, str]:
    """The sha256 of each arena the server holds, by memfd name."""
    return {name: sha256(path) for name, path in arena_fds(server.pid).items()}


def load(server: Server, root: Path, name: str, folder: str = "llama", **spec: Any) -> Any:
    post(server, source=str(root / folder), name=name, **spec)
    return wait_ready(server.url, name)


def two_held(tmp_path: Path, root: Path, env: dict[str, str], b_folder: str = "llama") -> Server:
    """A server holding `a` (fp32, from llama) and `b` (bf16), their snapshots written."""
    server = start(tmp_path, [], env=env)
    try:
        load(server, root, "a", dtype="float32")
        load(server, root, "b", b_folder, dtype="bfloat16")
        written(tmp_path, "a", "b")
    except BaseException:
        server.stop()
        raise
    return server


def _kept_when_not_admitted(tmp_path: Path, model_id: str) -> None:
    """A restore that is not admitted, whose admission fails, or that finds this process out
    of fds, is not held, and the snapshot stays for the next try (nothing is wrong with
    it)."""
    folder = tmp_path / "state" / FOLDER
    spec_key = json.loads((folder / f"{model_id}.json").read_text())["spec_key"]

    def fails(size: int) -> bool:
        raise RuntimeError("admission broke")

    snapshots = Snapshots(folder, lambda load_id: [])
    try:
        for admit in (lambda size: False, fails):
            assert snapshots.take(model_id, spec_key, admit=admit) is None
            assert snapshots.has(model_id)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.dup(0)  # every fd number below it is taken
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no fd more: EMFILE
        try:
            assert snapshots.take(model_id, spec_key) is None
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert snapshots.has(model_id)  # this process ran out of fds: nothing wrong with it
        _a_fifo_is_refused(snapshots, folder, model_id, spec_key)
        _a_changed_byte_is_refused(snapshots, folder, model_id, spec_key)
    finally:
        snapshots.stop()


def _a_changed_byte_is_refused(
    snapshots: Snapshots, folder: Path, model_id: str, spec_key: str
) -> None:
    """One byte of the weights changed on disk (sizes, header and checkpoint as recorded):
    the copy does not match the arena's checksum, so it is not held; the snapshot is put
    back after."""
    arena, info = folder / f"{model_id}.arena", folder / f"{model_id}.json"
    original, description = arena.read_bytes(), info.read_bytes()
    arena.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    assert snapshots.take(model_id, spec_key) is None
    assert not arena.exists() and not info.exists()  # unusable: removed
    arena.write_bytes(original)
    info.write_bytes(description)


def _a_fifo_is_refused(snapshots: Snapshots, folder: Path, model_id: str, spec_key: str) -> None:
    """A FIFO in place of the arena file (the state directory is not trusted) is refused at
    once, not opened and waited on for ever; the snapshot is put back after."""
    arena, info = folder / f"{model_id}.arena", folder / f"{model_id}.json"
    aside, description = folder / "aside", info.read_bytes()
    arena.rename(aside)
    os.mkfifo(arena)
    taken: list[object] = []
    taking = threading.Thread(target=lambda: taken.append(snapshots.take(model_id, spec_key)))
    taking.start()
    taking.join(30)
    blocked = taking.is_alive()
    if blocked:  # a writer lets the blocked open return, and the thread end
        os.close(os.open(arena, os.O_WRONLY | os.O_NONBLOCK))
        taking.join(30)
    assert not blocked
    assert taken == [None]
    assert not arena.exists() and not info.exists()  # unusable: removed
    aside.rename(arena)
    info.write_bytes(description)


def test_a_restart_holds_models_from_their_snapshots_without_a_load(
    tmp_path: Path, own_root: Path
) -> None:
    env = env_for(own_root, BASEHOLD_SNAPSHOTS="true")
    server = start(tmp_path, [], env=env)
    try:
        before = {
            "f": load(server, own_root, "f", dtype="float32"),
            "q": load(server, own_root, "q", **NF4),
        }
        written(tmp_path, "f", "q")
        held = arena_hashes(server)
        assert len(held) == 2

        server.kill()
        _kept_when_not_admitted(tmp_path, "f")
        server = start(tmp_path, [], env=env, port=int(server.url.rsplit(":", 1)[1]))
        for model_id in ("f", "q"):
            status = wait_ready(server.url, model_id)
            assert status["timings"]["restored_at"] is not None
            assert status["timings"]["ready_at"] == before[model_id]["timings"]["ready_at"]
            assert f"restored {model_id} from its snapshot" in server.output()
        assert arena_hashes(server) == held  # the same bytes, in new sealed memfds
        assert "[loader " not in server.output().split("restored f from its snapshot")[-1]

        nf4 = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        for model_id, spec in (("f", {}), ("q", {"quantization_config": nf4})):
            reference = from_pretrained(
                AutoModelForCausalLM, own_root / "llama", device_map="cpu", **spec
            )
            attached = Client(server.url).attach(model_id, holder="t", ttl_seconds=30)
            with attached as model, torch.no_grad():
                assert torch.equal(model(TOKENS).logits, reference(TOKENS).logits)
    finally:
        server.stop()


def test_a_changed_checkpoint_or_a_damaged_snapshot_loads_again(
    tmp_path: Path, own_root: Path
) -> None:
    env = env_for(own_root, BASEHOLD_SNAPSHOTS="true")
    server = two_held(tmp_path, own_root, env, "llama-2")
    try:
        config = own_root / "llama" / "config.json"
        os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
        with snapshot(tmp_path, "b").open("r+b") as arena:
            arena.truncate(arena.seek(0, os.SEEK_END) - 1)

        server = restart(server, tmp_path, env)
        for model_id in ("a", "b"):
            wait_ready(server.url, model_id)
        log = server.output()
        assert "not restoring a from its snapshot (its checkpoint's files changed since)" in log
        assert "not restoring b from its snapshot (" in log and "bytes, " in log
        assert "restored a from its snapshot" not in log
        written(tmp_path, "a", "b")  # written again, from the models loaded again
    finally:
        server.stop()


def test_snapshots_go_with_their_models_and_can_be_turned_off(
    tmp_path: Path, own_root: Path
) -> None:
    env = env_for(own_root, BASEHOLD_SNAPSHOTS="true")
    server = two_held(tmp_path, own_root, env)
    try:
        assert httpx.delete(f"{server.url}/v1/models/a", timeout=60).status_code == 204
        until(lambda: not snapshot(tmp_path, "a").exists(), "a's snapshot removed")
        assert snapshot(tmp_path, "b").exists()
        (tmp_path / "state" / FOLDER / ".c.arena").write_bytes(b"half-written")

        server = restart(server, tmp_path, env)  # the half-written one goes
        wait_ready(server.url, "b")
        assert "restored b from its snapshot" in server.output()
        assert sorted(p.name for p in (tmp_path / "state" / FOLDER).iterdir()) == [
            "b.arena",
            "b.json",
        ]

        server = restart(server, tmp_path, {**env, "BASEHOLD_SNAPSHOTS": "false"})
        wait_ready(server.url, "b")
        assert "restored b from its snapshot" not in server.output()
        assert not (tmp_path / "state" / FOLDER).exists()  # off: none kept
        load(server, own_root, "d", dtype="float32")
        assert not (tmp_path / "state" / FOLDER).exists()
    finally:
        server.stop()
