"""Bearer keys with scopes: 401 without a valid key, 403 without the scope."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ClientFactory, load

KEYS = {"admin-key-123": ["admin"], "reader-key-123": ["read"], "worker-key-123": ["worker"]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def secured(make_client: ClientFactory) -> TestClient:
    return make_client(api_keys=KEYS)


def test_no_key_is_401(secured: TestClient) -> None:
    response = secured.get("/v1/models")
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


def test_wrong_key_is_401(secured: TestClient) -> None:
    response = secured.get("/v1/memory", headers=bearer("not-a-real-key"))
    assert response.status_code == 401


def test_read_key_cannot_load(secured: TestClient, models_root: Path) -> None:
    response = secured.post(
        "/v1/models", json={"source": str(models_root / "gpt2")}, headers=bearer("reader-key-123")
    )
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert "admin" in response.json()["detail"]


def test_scopes(secured: TestClient, models_root: Path) -> None:
    status = load(secured, headers=bearer("admin-key-123"), source=str(models_root / "gpt2"))
    assert status["state"] == "ready"
    for key in ("reader-key-123", "worker-key-123", "admin-key-123"):
        assert secured.get(f"/v1/models/{status['id']}", headers=bearer(key)).status_code == 200
        assert secured.get("/v1/memory", headers=bearer(key)).status_code == 200
    for key in ("reader-key-123", "worker-key-123"):
        denied = secured.delete(f"/v1/models/{status['id']}", headers=bearer(key))
        assert denied.status_code == 403
    assert (
        secured.delete(f"/v1/models/{status['id']}", headers=bearer("admin-key-123")).status_code
        == 204
    )


def test_health_is_open(secured: TestClient) -> None:
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/readyz").json() == {"status": "ready", "restoring": 0}


def test_short_keys_are_refused_at_startup(make_client: ClientFactory) -> None:
    with pytest.raises(ValueError, match="shorter than 8"):
        make_client(api_keys={"short": ["admin"]})


def test_openapi_documents_bearer_and_contract(secured: TestClient) -> None:
    spec = secured.get("/openapi.json").json()
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert {"/v1/models", "/v1/models/{model_id}", "/v1/memory", "/healthz", "/readyz"} <= set(
        spec["paths"]
    )
    load_schema = spec["components"]["schemas"]["LoadRequest"]
    assert load_schema["examples"]


def test_an_ensure_key_loads_if_absent_finds_if_held_and_leases(
    make_client: ClientFactory, models_root: Path
) -> None:
    """A training job's key: `ensure` and `worker`. It may load a model that is not held and
    find one that is, then lease it; never unload, pin, or run a checkpoint's code."""
    job = bearer("job-key-12345")
    client = make_client(api_keys={**KEYS, "job-key-12345": ["ensure", "worker"]})
    source = str(models_root / "gpt2")
    status = load(client, headers=job, source=source)  # was 403: loads needed admin
    assert status["state"] == "ready"
    again = client.post("/v1/models", json={"source": source}, headers=job)
    assert again.status_code == 200 and again.json()["id"] == status["id"]  # found, not loaded
    leased = client.post(f"/v1/models/{status['id']}/leases", json={"holder": "job"}, headers=job)
    assert leased.status_code == 201, leased.text
    for body in ({"source": source, "pinned": True}, {"source": source, "trust_remote_code": True}):
        refused = client.post("/v1/models", json=body, headers=job)
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden", refused.text
        assert "admin key" in refused.json()["detail"]
    assert client.get(f"/v1/models/{status['id']}", headers=job).json()["pinned"] is False
    assert client.delete(f"/v1/models/{status['id']}", headers=job).status_code == 403
    assert client.delete(f"/v1/models/{status['id']}?force=true", headers=job).status_code == 403
    revoke = client.delete(f"/v1/leases/{leased.json()['lease_id']}", headers=job)
    assert revoke.status_code == 403  # not without the lease's secret (admins may)
