"""The registry's load path and unload races, through the HTTP API on real loads."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.common.errors import ModelNotReady
from service.common.load.progress import Progress
from service.common.load.spec import DType, LoadRequest
from service.loader.arena_placement import ArenaPlacement
from service.loader.pipeline import LoadContext, discard, load_and_place, prepare
from service.serving.registry.record import new_load_id
from tests.conftest import ClientFactory, app_of, estimated_sizes, load


def test_concurrent_forced_deletes_never_fail(client: TestClient, models_root: Path) -> None:
    status = load(client, source=str(models_root / "llama"), dtype="float32", name="m")
    lease = client.post("/v1/models/m/leases", json={"holder": "w", "ttl_seconds": 60})
    assert lease.status_code == 201
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: client.delete("/v1/models/m?force=true"), range(16)))
    statuses = sorted({r.status_code for r in codes})
    assert set(statuses) <= {202, 204, 404}, [r.text for r in codes if r.status_code >= 500]
    assert 204 in statuses
    assert client.get(f"/v1/models/{status['id']}").status_code == 404
    assert client.get("/v1/leases").json()["leases"] == []


def test_eviction_only_when_it_makes_the_load_fit(
    make_client: ClientFactory, models_root: Path
) -> None:
    gpt2, t5 = estimated_sizes(make_client(), models_root, "gpt2", "t5")
    # Evicting gpt2 would free gpt2's bytes, still not enough for t5 (which is larger).
    assert t5 > gpt2
    client = make_client(
        host_memory_budget=str(gpt2 + (t5 - gpt2) // 2), memory_headroom="0", eviction="lru-idle"
    )
    held = load(client, source=str(models_root / "gpt2"), dtype="float32")
    assert held["state"] == "ready"
    refused = client.post(
        "/v1/models", json={"source": str(models_root / "t5"), "dtype": "float32"}
    )
    assert refused.status_code == 507, refused.text
    assert client.get(f"/v1/models/{held['id']}").json()["state"] == "ready"
    assert "basehold_evictions_total 0.0" in client.get("/metrics").text


def test_every_load_of_a_name_has_its_own_load_id(client: TestClient, models_root: Path) -> None:
    first = load(client, source=str(models_root / "llama"), dtype="float32", name="m")
    registry = app_of(client).state.registry
    first_load = registry.get("m").load_id
    assert client.delete("/v1/models/m").status_code == 204
    second = load(client, source=str(models_root / "llama"), dtype="float32", name="m")
    assert first["id"] == second["id"] == "m"
    assert registry.get("m").load_id != first_load


def test_cleanup_of_a_cancelled_load_never_touches_a_newer_one(
    models_root: Path, socket_path: Path, tmp_path: Path
) -> None:
    """What a cancelled load leaves is discarded by its own load id, so it cannot remove
    the arena or offload folder of a newer load of the same model id."""
    placement = ArenaPlacement(socket_path)
    ctx = LoadContext(roots=[models_root], offload_root=tmp_path, placement=placement)
    spec = LoadRequest(source=str(models_root / "llama"), dtype=DType.FLOAT32, device_map="cpu")
    cancelled, newer = new_load_id("m"), new_load_id("m")
    (tmp_path / newer).mkdir()  # the newer load's offload folder
    loaded = load_and_place("m", newer, prepare(spec, None, ctx), ctx, Progress())
    assert loaded.facts.placed.shareable
    discard(cancelled, ctx)  # the cancelled load's cleanup, running late
    os.close(placement.dup_fd(newer))  # the newer arena is still held
    assert (tmp_path / newer).is_dir()
    discard(newer, ctx)
    with pytest.raises(ModelNotReady):
        placement.dup_fd(newer)
    assert not (tmp_path / newer).exists()
