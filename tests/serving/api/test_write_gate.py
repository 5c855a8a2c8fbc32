"""What a handing-over and a handed-over basehold answer (the gate, in the real app)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.serving.api.write_gate import WriteGate
from tests.conftest import app_of


def test_changes_wait_while_handing_over_and_reads_are_answered(client: TestClient) -> None:
    gate: WriteGate = app_of(client).state.writes
    gate.close()
    refused = client.post("/v1/models", json={"source": "x"})
    assert refused.status_code == 503 and refused.json()["code"] == "handing_over"
    assert refused.headers["retry-after"] == "1"
    assert client.delete("/v1/models/x").json()["code"] == "handing_over"
    assert client.get("/v1/models").status_code == 200
    assert gate.wait_idle(1.0)
    gate.open()  # a handover that did not happen: changes are answered again
    assert client.post("/v1/models", json={}).status_code == 422


def test_a_handed_over_instance_answers_only_healthz(client: TestClient) -> None:
    app_of(client).state.writes.hand_over(4242)
    gone = client.get("/v1/models")
    assert gone.status_code == 503 and gone.json()["code"] == "handed_over"
    assert "4242" in gone.json()["detail"]
    assert client.get("/readyz").json()["code"] == "handed_over"
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["restarts"] == 0
