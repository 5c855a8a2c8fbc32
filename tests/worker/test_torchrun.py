"""torchrun with 2 ranks on the CPU, no `lease_callback`: under DistributedDataParallel
written by hand, accelerate's `prepare` and a plain Trainer, every rank keeps the one
arena shared (DDP's start-up broadcast and buffer sync skip the base: at most 5% of it
copied per rank), while the adapters still sync (the same on both ranks)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.serving.test_server_e2e import Server, wait_ready
from tests.worker.ddp_worker import WRAPPERS, launch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_ranks_share_one_arena_under_every_ddp_wrapper(
    live_server: Server, models_root: Path, tmp_path: Path
) -> None:
    source = models_root / "llama"
    body = {"source": str(source), "name": "ranks", "dtype": "float32"}
    httpx.post(f"{live_server.url}/v1/models", json=body).raise_for_status()
    assert wait_ready(live_server.url, "ranks")["state"] == "ready"
    ranks = launch(live_server.url, "ranks", source, tmp_path, "basehold", timeout=600)
    print("\nrank | wrapper | arena copied (MiB) | model (MiB) | losses | adapters")
    for r in ranks:
        for run in r["runs"]:
            print(
                f"{r['rank']} | {run['wrapper']} | {run['arena_copied'] / 2**20:.2f} | "
                f"{run['model_bytes'] / 2**20:.1f} | {run['losses']} | {run['adapters']:.6f}"
            )
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["arena_mapped"], r  # the base was never copied away from the arena
        assert [run["wrapper"] for run in r["runs"]] == list(WRAPPERS)
        for run in r["runs"]:
            assert run["arena_copied"] <= 0.05 * run["model_bytes"], run  # nor written by DDP
            assert len(run["losses"]) == 3, run
    for first, second in zip(ranks[0]["runs"], ranks[1]["runs"], strict=True):
        # Each rank trained on other batches: equal adapters mean their gradients synced.
        assert first["adapters"] == pytest.approx(second["adapters"], rel=1e-6), first["wrapper"]
    leases = httpx.get(f"{live_server.url}/v1/leases").json()["leases"]
    assert leases == []  # every rank released every lease
