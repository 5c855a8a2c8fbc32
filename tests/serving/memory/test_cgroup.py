"""The container's memory limit: read from cgroup v2 and v1 layouts, and obeyed by a real
`basehold serve` in a real memory cgroup of this machine (a child of the test's own)."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from service.serving.memory.cgroup import cgroup_memory, hierarchy
from tests import checkpoints
from tests.conftest import until
from tests.serving.test_server_e2e import start

GIB = 2**30
V1_UNLIMITED = "9223372036854771712"


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc"
    _tree(proc, {"cgroup": cgroup, "mountinfo": mountinfo})
    return proc


def test_v2_the_tightest_ancestor_binds_and_inactive_file_cache_is_not_counted(
    tmp_path: Path,
) -> None:
    fs = tmp_path / "cgroup2"
    _tree(
        fs,
        {
            # The pod's limit (4 GiB, 3 GiB in use) binds before the container's (6 GiB).
            "kubepods/pod1/memory.max": str(4 * GIB),
            "kubepods/pod1/memory.current": str(3 * GIB + 512 * 2**20),
            "kubepods/pod1/memory.stat": f"anon 1\ninactive_file {512 * 2**20}\n",
            "kubepods/pod1/ctr/memory.max": str(6 * GIB),
            "kubepods/pod1/ctr/memory.current": str(GIB),
            "kubepods/pod1/ctr/memory.stat": "inactive_file 0\n",
            "kubepods/memory.max": "max",
            "kubepods/memory.current": str(9 * GIB),
        },
    )
    mountinfo = f"30 23 0:26 / {fs} rw,nosuid - cgroup2 cgroup2 rw\n"
    found = cgroup_memory(_proc(tmp_path, "0::/kubepods/pod1/ctr\n", mountinfo))
    assert found is not None
    assert (found.limit_bytes, found.usage_bytes) == (4 * GIB, 3 * GIB)
    assert (found.path, found.setting, found.available_bytes) == (
        "/kubepods/pod1",
        "memory.max",
        GIB,
    )
    assert "4.00 GiB (memory.max of cgroup /kubepods/pod1)" in found.describe()


def test_v2_in_a_cgroup_namespace_and_with_no_limit(tmp_path: Path) -> None:
    fs = tmp_path / "cgroup2"
    mountinfo = f"30 23 0:26 / {fs} rw - cgroup2 cgroup2 rw\n"
    _tree(fs, {"memory.max": str(2 * GIB), "memory.current": str(GIB // 2)})
    found = cgroup_memory(_proc(tmp_path, "0::/\n", mountinfo))  # the container sees "/"
    assert found is not None and found.available_bytes == GIB + GIB // 2
    (fs / "memory.max").write_text("max\n")
    assert cgroup_memory(_proc(tmp_path, "0::/\n", mountinfo)) is None


def test_v1_memory_controller_under_a_mount_root(tmp_path: Path) -> None:
    fs = tmp_path / "memory"
    _tree(
        fs,
        {
            "memory.limit_in_bytes": V1_UNLIMITED,
            "memory.usage_in_bytes": str(40 * GIB),
            "ctr/memory.limit_in_bytes": str(2 * GIB),
            "ctr/memory.usage_in_bytes": str(GIB),
            "ctr/memory.stat": f"cache 5\ninactive_file 7\ntotal_inactive_file {GIB // 4}\n",
        },
    )
    # A host process: the hierarchy is mounted from its root ("/"), the process is deeper.
    mountinfo = (
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        f"35 31 0:32 / {fs} rw,relatime - cgroup cgroup rw,memory\n"
    )
    cgroup = "4:memory:/ctr\n3:cpuset:/\n0::/\n"
    found = cgroup_memory(_proc(tmp_path, cgroup, mountinfo))
    assert found is not None
    assert (found.limit_bytes, found.usage_bytes, found.setting) == (
        2 * GIB,
        GIB - GIB // 4,
        "memory.limit_in_bytes",
    )


def test_no_cgroup_filesystem_is_no_limit(tmp_path: Path) -> None:
    assert cgroup_memory(_proc(tmp_path, "0::/\n", "")) is None
    assert cgroup_memory(tmp_path / "no-proc") is None


# -- a real cgroup ------------------------------------------------------------------------
def _sparse_llama(path: Path, config: LlamaConfig) -> Path:
    """A checkpoint of `config` whose weights file holds no data (a sparse file of the
    right size with a real safetensors header): priced like the real one, nothing to read."""
    path.mkdir(parents=True)
    config.save_pretrained(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    header: dict[str, object] = {}
    offset = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with (path / "model.safetensors").open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        out.truncate(8 + len(encoded) + offset)
    return path


@pytest.fixture
def limited_cgroup() -> Iterator[Path]:
    """A child of this process's memory cgroup, limited to 2 GiB (root only)."""
    found = hierarchy()
    if found is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup memory hierarchy")
    child = found.directory / f"bh-test-{os.getpid()}"
    try:
        child.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a child memory cgroup here: {exc}")
    limit = "memory.max" if found.version == 2 else "memory.limit_in_bytes"
    (child / limit).write_text(str(2 * GIB))
    yield child
    # Its processes have exited (the test stops its server); rmdir fails while any is left.
    until(lambda: not (child / "cgroup.procs").read_text().strip(), "the cgroup to empty", 30)
    deadline = time.monotonic() + 30
    while True:
        try:
            child.rmdir()
            return
        except OSError:
            assert time.monotonic() < deadline, "the test cgroup could not be removed"
            time.sleep(0.1)


def test_a_service_in_a_2_gib_cgroup_refuses_a_3_gib_load_at_post(
    tmp_path: Path, limited_cgroup: Path
) -> None:
    models = tmp_path / "models"
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
    )
    big = _sparse_llama(models / "big", config)  # ~3.3 GiB in float32, ~0 on disk
    small = checkpoints.llama(models / "small")
    server = start(tmp_path, [], env={"BASEHOLD_MODELS_ROOT": str(models)})
    try:
        (limited_cgroup / "cgroup.procs").write_text(str(server.process.pid))
        host = httpx.get(f"{server.url}/v1/memory").json()["host"]
        assert host["container_limit_bytes"] == 2 * GIB, host
        assert host["container_usage_bytes"] < 2 * GIB < host["available_bytes"], host
        answer = httpx.post(
            f"{server.url}/v1/models", json={"source": str(big), "dtype": "float32"}
        )
        assert answer.status_code == 507, answer.text  # was 202, and the loader OOM-killed
        problem = answer.json()
        assert problem["code"] == "insufficient_memory"
        assert "the container's memory limit is 2.00 GiB" in problem["detail"], problem
        assert "Raise the container's memory limit" in problem["detail"]
        fits = httpx.post(f"{server.url}/v1/models", json={"source": str(small)})
        assert fits.status_code == 202, fits.text
        metrics = httpx.get(f"{server.url}/metrics").text
        [line] = [
            x for x in metrics.splitlines() if x.startswith("basehold_container_memory_limit")
        ]
        assert float(line.rsplit(" ", 1)[1]) == 2 * GIB, line
    finally:
        server.stop()
