"""The serving process never loads torch (nor transformers, accelerate, bitsandbytes):
loader processes do the model work, the service holds fds and manifests."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx

from tests.serving.test_server_e2e import start, wait_ready

HEAVY = ("libtorch", "transformers", "accelerate", "bitsandbytes", "_C.cpython")


def held_memfds(pid: int) -> set[int]:
    """The memfds `pid` holds, by inode: the snapshot writer's duplicates of an arena count
    once, and an fd it closes while this reads is passed over."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("/memfd:"):
                found.add(os.stat(fd).st_ino)
        except FileNotFoundError:
            continue
    return found


def test_a_serving_process_holding_models_maps_no_libtorch(
    tmp_path: Path, models_root: Path
) -> None:
    # A cold `python -m service serve` (nothing imported before it started) with a loader
    # template of its own (not the one the suite shares).
    env = {"BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)]), "BASEHOLD_LOADER_TEMPLATE": ""}
    server = start(tmp_path, [], env=env, prefix=[sys.executable, "-m", "service"])
    try:
        specs = [
            {"source": str(models_root / "gpt2"), "dtype": "float32"},
            {"source": str(models_root / "llama"), "quantization": {"method": "bnb-4bit"}},
            {"source": str(models_root / "llama"), "quantization": {"method": "bnb-8bit"}},
        ]
        for spec in specs:
            posted = httpx.post(f"{server.url}/v1/models", json=spec, timeout=60)
            assert posted.status_code == 202, posted.text
            assert wait_ready(server.url, posted.json()["id"])["state"] == "ready"
        estimate = httpx.post(f"{server.url}/v1/estimate", json=specs[0], timeout=60)
        assert estimate.status_code == 200, estimate.text
        memory = httpx.get(f"{server.url}/v1/memory").json()
        assert len(memory["models"]) == 3
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        loaded = sorted(
            {line.split()[-1] for line in maps.splitlines() if any(h in line for h in HEAVY)}
        )
        assert loaded == [], loaded
        # It holds the arenas as the memfds the loaders handed over, without mapping them.
        memfds = held_memfds(server.pid)
        assert len(memfds) == 2, memfds  # fp32 and nf4; the 8-bit model is in its runner
        assert "memfd:" not in maps
    finally:
        server.stop()
