"""The app's own lifecycle: the lease reaper and shutdown keep going whatever fails."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.settings import Settings
from service.serving.state.lock import StateLock
from tests.conftest import MINILM, ClientFactory, app_of, load


def test_the_reaper_survives_failing_passes(
    make_client: ClientFactory, models_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(lease_reap_seconds=0.05)
    lending = app_of(client).state.lending
    real: Callable[[], Any] = lending.expire
    failures = {"left": 3}

    def flaky() -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real()

    lending.expire = flaky
    model = load(client, source=str(models_root / "gpt2"), dtype="float32")
    granted = client.post(
        f"/v1/models/{model['id']}/leases", json={"holder": "w", "ttl_seconds": 1}
    )
    assert granted.status_code == 201
    deadline = time.monotonic() + 30
    while client.get("/v1/leases").json()["leases"]:
        assert time.monotonic() < deadline, "the reaper stopped after a failing pass"
        time.sleep(0.05)
    assert failures["left"] == 0
    assert "lease reaper: expire failed" in caplog.text


def test_shutdown_finishes_every_step_when_one_fails(
    tmp_path: Path, models_root: Path, socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    settings = Settings(state_dir=state, socket=socket_path, model_roots=[models_root, MINILM])
    app = create_app(settings)

    def broken() -> None:
        raise RuntimeError("unload exploded")

    with TestClient(app, base_url="http://localhost") as client:
        assert load(client, source=str(models_root / "gpt2"), name="kept")["state"] == "ready"
        app.state.registry.shutdown = broken
    assert "shutdown: unload models failed" in caplog.text
    assert not socket_path.exists(), "the socket was not stopped"
    lock = StateLock(state)
    lock.acquire()  # the lock was released
    lock.release()
    # The database was frozen before, and closed after, the failing step.
    conn = sqlite3.connect(state / "basehold.sqlite3")
    assert conn.execute("SELECT id, state FROM models").fetchall() == [("kept", "ready")]
    conn.close()
