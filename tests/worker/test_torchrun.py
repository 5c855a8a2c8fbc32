"""torchrun with 2 ranks on the CPU, the Trainer wrapping DDP: every rank maps the one
arena and keeps it shared (its private growth is a small part of the model, none of the
arena's pages copied), where plain `from_pretrained` holds a private copy per rank."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.serving.test_server_e2e import Server, wait_ready
from tests.worker.ddp_worker import launch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_ranks_share_one_arena(live_server: Server, models_root: Path, tmp_path: Path) -> None:
    source = models_root / "llama"
    body = {"source": str(source), "name": "ranks", "dtype": "float32"}
    httpx.post(f"{live_server.url}/v1/models", json=body).raise_for_status()
    assert wait_ready(live_server.url, "ranks")["state"] == "ready"
    ranks = launch(live_server.url, "ranks", source, tmp_path, "basehold", timeout=600)
    print("\nrank | private growth (MiB) | arena mapped | arena pages copied | model (MiB)")
    for r in ranks:
        print(
            f"{r['rank']} | {r['private_growth'] / 2**20:.1f} | {r['arena_mapped']} | "
            f"{r['arena_private']} | {r['model_bytes'] / 2**20:.1f} | losses {r['losses']}"
        )
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["arena_mapped"], r  # the base was never copied away from the arena
        assert r["arena_private"] < 0.05 * r["model_bytes"], r  # nor written by DDP
        assert len(r["losses"]) == 3
    leases = httpx.get(f"{live_server.url}/v1/leases").json()["leases"]
    assert leases == []  # both ranks released theirs
