"""Restore applies today's load policy to what the state database recorded (in-process app,
stopped and started again on the same state directory)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.registry.record import utcnow
from service.serving.settings import Settings
from service.serving.state.database import LeaseRow, ModelRow, StateDB
from tests.conftest import MINILM, wait_for


@contextmanager
def running(state: Path, socket: Path, roots: list[Path], **settings: Any) -> Iterator[TestClient]:
    app = create_app(Settings(state_dir=state, socket=socket, model_roots=roots, **settings))
    with TestClient(app, base_url="http://localhost") as client:
        yield client


def test_restore_refuses_what_the_policy_now_refuses(
    tmp_path: Path, models_root: Path, socket_path: Path
) -> None:
    state = tmp_path / "state"
    roots = [models_root, MINILM.parent]
    gpt2 = str(models_root / "gpt2")
    with running(state, socket_path, roots, allow_remote_code=True) as client:
        body = {"source": gpt2, "name": "coded", "trust_remote_code": True, "dtype": "float32"}
        assert client.post("/v1/models", json=body).status_code == 202
        assert wait_for(client, "coded")["state"] == "ready"
        leased = client.post("/v1/models/coded/leases", json={"holder": "w", "ttl_seconds": 60})
        assert leased.status_code == 201
        plain = {"source": gpt2, "name": "plain", "dtype": "float32"}
        assert client.post("/v1/models", json=plain).status_code == 202
        assert wait_for(client, "plain")["state"] == "ready"
    # While it is stopped, rows nobody could have POSTed land in the database.
    db = StateDB.open(state)
    now = utcnow()
    planted: dict[str, dict[str, Any]] = {
        "gpu7": {"source": gpt2, "name": "gpu7", "device_map": "cuda:7"},
        "outside": {"source": "/etc", "name": "outside"},
        "<img src=x onerror=alert(1)>": {"source": gpt2, "dtype": "float16"},
    }
    for model_id, spec in planted.items():
        db.put_model(ModelRow(model_id, spec.get("name"), spec, "k" * 64, "ready", now, now))
    db.close()

    with running(state, socket_path, roots, allow_remote_code=False) as client:
        coded = wait_for(client, "coded")
        assert coded["state"] == "failed"
        assert coded["error"]["code"] == "remote_code_refused", coded
        assert client.get("/v1/leases").json()["leases"] == []  # no orphan lease
        assert wait_for(client, "gpu7")["error"]["code"] == "invalid_spec"
        assert wait_for(client, "outside")["error"]["code"] in (
            "source_not_allowed",
            "source_not_found",
        )
        ids = {m["id"] for m in client.get("/v1/models").json()["models"]}
        assert ids == {"coded", "gpu7", "outside", "plain"}
        assert wait_for(client, "plain")["state"] == "ready"
        assert client.get("/readyz").status_code == 200
    # Failed rows are forgotten: the next start restores only what still loads.
    db = StateDB.open(state)
    assert {row.id for row in db.models()} == {"plain"}
    db.close()


def test_pinned_and_leased_models_are_restored_first(
    tmp_path: Path, models_root: Path, socket_path: Path
) -> None:
    """One load at a time: the pinned and the leased model (least recently used) start
    before the most recently used plain one."""
    state = tmp_path / "state"
    gpt2 = str(models_root / "gpt2")
    state.mkdir(mode=0o700)
    db = StateDB.open(state)
    now = utcnow()
    rows: dict[str, tuple[dict[str, object], datetime]] = {  # last used: plain most recently
        "plain": ({"source": gpt2, "name": "plain", "dtype": "float32"}, now),
        "leased": (
            {"source": gpt2, "name": "leased", "dtype": "float16"},
            now - timedelta(minutes=1),
        ),
        "pinned": (
            {"source": gpt2, "name": "pinned", "dtype": "bfloat16", "pinned": True},
            now - timedelta(minutes=2),
        ),
    }
    for model_id, (spec, used) in rows.items():
        db.put_model(ModelRow(model_id, model_id, spec, "k" * 64, "ready", used, used))
    lease = LeaseRow("lease-1", "leased", "w", 600, now, now + timedelta(minutes=10), None)
    db.put_lease(lease)
    db.close()
    with running(state, socket_path, [models_root], max_concurrent_loads=1) as client:
        started = {m: wait_for(client, m)["timings"]["started_at"] for m in rows}
        ready = {m: wait_for(client, m)["state"] for m in rows}
    assert ready == {m: "ready" for m in rows}
    assert max(started["pinned"], started["leased"]) < started["plain"], started
