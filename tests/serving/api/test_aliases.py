"""One copy per spec: a POST of a held spec under another name finds the held model, and the
name becomes an alias of it (issue 28)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.serving.state.database import StateDB
from tests.conftest import ClientFactory, app_of, load


def test_a_held_spec_under_another_name_is_found_not_loaded_again(
    client: TestClient, models_root: Path
) -> None:
    source = str(models_root / "gpt2")
    first = load(client, source=source, name="base-a", dtype="float32")
    assert first["state"] == "ready"
    again = client.post("/v1/models", json={"source": source, "name": "base-b", "dtype": "float32"})
    assert again.status_code == 200, again.text  # was 202: a second copy loaded
    assert again.json()["id"] == "base-a" and again.json()["aliases"] == ["base-b"]
    assert [m["id"] for m in client.get("/v1/models").json()["models"]] == ["base-a"]
    assert client.get("/v1/models/base-b").json()["id"] == "base-a"
    lease = client.post("/v1/models/base-b/leases", json={"holder": "job"})
    assert lease.status_code == 201 and lease.json()["model_id"] == "base-a"
    assert client.get("/v1/models/base-a").json()["leases"] == 1
    # The alias's name is taken by that spec: another spec under it is refused.
    other = client.post("/v1/models", json={"source": source, "name": "base-b", "dtype": "float16"})
    assert other.status_code == 409 and other.json()["code"] == "name_taken", other.text
    # DELETE of an alias drops the name only; the model stays under its id.
    assert client.delete("/v1/models/base-b").status_code == 204
    assert client.get("/v1/models/base-a").json()["aliases"] == []
    assert client.get("/v1/models/base-b").status_code == 404
    secret = {"X-Lease-Secret": lease.json()["secret"]}
    released = client.delete(f"/v1/leases/{lease.json()['lease_id']}", headers=secret)
    assert released.status_code == 204
    assert client.delete("/v1/models/base-a").status_code == 204


def test_aliases_survive_a_restart(make_client: ClientFactory, models_root: Path) -> None:
    source = str(models_root / "gpt2")
    client = make_client()
    load(client, source=source, name="base-a", dtype="float32")
    client.post("/v1/models", json={"source": source, "name": "base-b", "dtype": "float32"})
    state_dir = app_of(client).state.settings.state_dir
    client.__exit__(None, None, None)  # a shutdown keeps the state database as it is
    db = StateDB.open(state_dir)
    [row] = db.models()
    db.close()
    assert (row.id, row.aliases) == ("base-a", ("base-b",))
    restarted = make_client(state_dir=state_dir)
    status = restarted.get("/v1/models/base-b").json()
    assert status["id"] == "base-a" and status["aliases"] == ["base-b"]
