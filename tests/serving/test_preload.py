"""BASEHOLD_PRELOAD ensures models at start (idempotent with restore, /readyz waits, bad
entries logged and skipped) and `"pinned": true` keeps a model from eviction."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.registry.record import utcnow
from service.serving.settings import Settings
from service.serving.state.database import ModelRow, StateDB
from service.serving.state.lock import StateDirLocked, StateLock
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


def test_preload_waits_for_the_state_lock(
    tmp_path: Path, models_root: Path, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preload ran beside startup, before the state lock was taken: a service that could
    not start (another one serves its state directory) loaded models anyway."""
    preload = tmp_path / "preload.yaml"
    preload.write_text(yaml.safe_dump([{"source": str(models_root / "gpt2"), "name": "m"}]))
    settings = Settings(
        state_dir=tmp_path / "state", socket=socket_path, model_roots=[models_root], preload=preload
    )
    app = create_app(settings)
    # The thread that starts the loader template (and used to preload right after).
    warming: list[threading.Thread] = []
    warm = app.state.loaders.warm

    def noted_warm() -> None:
        warming.append(threading.current_thread())
        warm()

    monkeypatch.setattr(app.state.loaders, "warm", noted_warm)
    other = StateLock(settings.state_dir)
    other.acquire()
    try:
        with pytest.raises(StateDirLocked), TestClient(app, base_url="http://localhost"):
            pass
        until(lambda: warming, "the loader template was never started", 30)
        warming[0].join(60)
        assert not warming[0].is_alive(), "the loader template never started"
        assert app.state.registry.records() == [], "a service that did not start preloaded"
        assert not app.state.preload.done
    finally:
        other.release()
        app.state.registry.shutdown()


def test_preload_runs_after_restore(
    tmp_path: Path, models_root: Path, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model both restored and preloaded is restored, then found by the preload: one
    load. Preload used to run before restore, whose record then replaced the preload's
    active one (two loads of one id)."""
    spec: dict[str, object] = {
        "source": str(models_root / "gpt2"),
        "name": "base",
        "dtype": "float32",
    }
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    db = StateDB.open(state)
    now = utcnow()
    db.put_model(ModelRow("base", "base", spec, "k" * 64, "ready", now, now))
    db.close()
    preload = tmp_path / "preload.yaml"
    preload.write_text(yaml.safe_dump([spec]))
    app = create_app(
        Settings(state_dir=state, socket=socket_path, model_roots=[models_root], preload=preload)
    )
    registry = app.state.registry
    calls: list[str] = []

    def noted(name: str) -> Callable[..., Any]:
        real = getattr(registry, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return call

    for name in ("restore", "submit"):
        monkeypatch.setattr(registry, name, noted(name))
    with TestClient(app, base_url="http://localhost") as client:
        until(lambda: _ready(client), "/readyz never said ready", 120)
        assert calls == ["restore", "submit"]
        held = _held(client)
        assert list(held) == ["base"] and held["base"]["state"] == "ready"
        timings = held["base"]["timings"]
        assert isinstance(timings, dict) and timings["restored_at"] is not None
