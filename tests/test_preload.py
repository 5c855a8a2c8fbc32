"""BASEHOLD_PRELOAD ensures models at start (idempotent with restore, /readyz waits, bad
entries logged and skipped) and `"pinned": true` keeps a model from eviction."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.conftest import ClientFactory, estimated_sizes, load, until


def _ready(client: TestClient) -> bool:
    return client.get("/readyz").status_code == 200


def _held(client: TestClient) -> dict[str, dict[str, object]]:
    return {m["id"]: m for m in client.get("/v1/models").json()["models"]}


def test_preload_ensures_its_models_and_skips_bad_entries(
    make_client: ClientFactory,
    models_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    entries = [
        {"source": str(models_root / "llama"), "name": "base", "dtype": "float32", "pinned": True},
        {"source": str(models_root / "gpt2"), "dtype": "float32"},
        {"source": str(models_root / "gpt2"), "dtype": "float64"},  # not a dtype
        {"source": "/etc", "name": "outside"},  # outside the model roots
    ]
    preload = tmp_path / "preload.yaml"
    preload.write_text(yaml.safe_dump({"models": entries}))
    state = tmp_path / "state-preload"
    with caplog.at_level(logging.ERROR, "basehold.preload"):
        client = make_client(preload=preload, state_dir=state)
        until(lambda: _ready(client), "/readyz never said ready after the preload", 120)
    held = _held(client)
    assert len(held) == 2 and held["base"]["pinned"] is True
    assert {m["state"] for m in held.values()} == {"ready"}
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 2
    assert "entry 3" in refused[0] and "entry 4" in refused[1]
    assert "source_not_allowed" in refused[1]
    client.__exit__(None, None, None)

    # A restart with the same file: what was restored is found, not loaded twice.
    again = make_client(preload=preload, state_dir=state)
    until(lambda: _ready(again), "/readyz never said ready after the restart", 120)
    assert _held(again).keys() == held.keys()
    assert _held(again)["base"]["pinned"] is True


def test_an_unreadable_preload_file_preloads_nothing(
    make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    preload = tmp_path / "preload.json"
    preload.write_text(json.dumps({"source": "not a list"}))
    with caplog.at_level(logging.ERROR, "basehold.preload"):
        client = make_client(preload=preload)
        until(lambda: _ready(client), "/readyz never said ready", 60)
    assert _held(client) == {}
    assert any("must be a list" in r.getMessage() for r in caplog.records)


def test_pinned_models_are_never_evicted(make_client: ClientFactory, models_root: Path) -> None:
    gpt2, llama, t5 = estimated_sizes(make_client(), models_root, "gpt2", "llama", "t5")
    client = make_client(
        host_memory_budget=str(gpt2 + llama + t5 // 2), memory_headroom="0", eviction="lru-idle"
    )
    older = load(client, source=str(models_root / "gpt2"), dtype="float32")
    newer = load(client, source=str(models_root / "llama"), dtype="float32")
    # Pinning the least recently used one (a POST of its spec with pinned): still held.
    pinned = client.post(
        "/v1/models",
        json={"source": str(models_root / "gpt2"), "dtype": "float32", "pinned": True},
    )
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    assert pinned.json()["id"] == older["id"]
    load(client, source=str(models_root / "llama"), dtype="float32")  # llama used last
    third = load(client, source=str(models_root / "t5"), dtype="float32")
    assert third["state"] == "ready"
    assert set(_held(client)) == {older["id"], third["id"]}, "the unpinned one goes"
    assert newer["id"] not in _held(client)
    # With t5 leased, only the pinned model could make room: the load is refused and the
    # pinned model stays.
    lease = client.post(f"/v1/models/{third['id']}/leases", json={"holder": "w"})
    assert lease.status_code == 201
    refused = client.post(
        "/v1/models", json={"source": str(models_root / "llama"), "dtype": "float32"}
    )
    assert refused.status_code == 507, refused.text
    assert older["id"] in _held(client)
