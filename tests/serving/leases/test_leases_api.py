"""Lease endpoints over HTTP (in-process app): create, renew, release, list, expiry, scopes."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.common.errors import TooManyLeases
from service.serving.leases.leases import MAX_TTL_SECONDS, LeaseTable
from service.serving.state.database import LeaseRow, StateDB
from tests.conftest import Answer, ClientFactory, load, until
from tests.serving.api.test_auth import KEYS, bearer


def lease(client: TestClient, model_id: str, ttl: int = 60, **kw: Any) -> Answer:
    return client.post(
        f"/v1/models/{model_id}/leases", json={"holder": "trainer-1", "ttl_seconds": ttl}, **kw
    )


def test_lease_lifecycle(client: TestClient, models_root: Path) -> None:
    status = load(client, source=str(models_root / "llama"), dtype="float32")
    assert status["shareable"] is True and status["shareable_reason"] is None
    created = lease(client, status["id"])
    assert created.status_code == 201, created.text
    body = created.json()
    handle = body["handle"]
    assert handle["arena"]["name"].startswith("basehold:") and handle["arena"]["socket"]
    assert len(body["secret"]) >= 32
    assert handle["architecture"] == "LlamaForCausalLM"
    assert "model.layers.0.self_attn.q_proj.weight" in handle["parameters"]
    assert client.get(f"/v1/models/{status['id']}").json()["leases"] == 1
    memory = client.get("/v1/memory").json()
    assert memory["host"]["shared_arena_bytes"] == handle["arena"]["size"]

    first_expiry = datetime.fromisoformat(body["expires_at"])
    time.sleep(0.05)
    secret = {"X-Lease-Secret": body["secret"]}
    renewed = client.post(f"/v1/leases/{body['lease_id']}/renew", headers=secret).json()
    assert datetime.fromisoformat(renewed["expires_at"]) > first_expiry
    assert "handle" not in renewed and "secret" not in renewed
    listed = client.get("/v1/leases").json()["leases"]
    assert [x["lease_id"] for x in listed] == [body["lease_id"]]
    assert body["secret"] not in client.get("/v1/leases").text

    assert client.delete(f"/v1/leases/{body['lease_id']}", headers=secret).status_code == 204
    missing = client.delete(f"/v1/leases/{body['lease_id']}", headers=secret)
    assert missing.status_code == 404 and missing.json()["code"] == "lease_not_found"
    assert client.get(f"/v1/models/{status['id']}").json()["leases"] == 0
    assert client.delete(f"/v1/models/{status['id']}").status_code == 204


def test_unload_refused_while_leased_then_forced(client: TestClient, models_root: Path) -> None:
    status = load(client, source=str(models_root / "gpt2"))
    body = lease(client, status["id"]).json()
    refused = client.delete(f"/v1/models/{status['id']}")
    assert refused.status_code == 409 and refused.json()["code"] == "model_leased"
    assert "force=true" in refused.json()["detail"]
    assert client.delete(f"/v1/models/{status['id']}?force=true").status_code == 204
    renew = client.post(
        f"/v1/leases/{body['lease_id']}/renew", headers={"X-Lease-Secret": body["secret"]}
    )
    assert renew.status_code == 404


def test_unrenewed_lease_expires(make_client: ClientFactory, models_root: Path) -> None:
    client = make_client(lease_reap_seconds=0.1)
    status = load(client, source=str(models_root / "gpt2"))
    lease(client, status["id"], ttl=1)
    deadline = time.monotonic() + 5
    while client.get(f"/v1/models/{status['id']}").json()["leases"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.delete(f"/v1/models/{status['id']}").status_code == 204


def test_not_shareable_models(client: TestClient, models_root: Path) -> None:
    eight = load(client, source=str(models_root / "llama"), quantization={"method": "bnb-8bit"})
    assert eight["shareable"] is False and "8-bit" in eight["shareable_reason"]
    refused = lease(client, eight["id"])
    assert refused.status_code == 409
    assert refused.json()["code"] == "not_shareable"
    offloaded = load(
        client,
        source=str(models_root / "llama"),
        dtype="float32",
        max_memory={"cpu": "300KB"},
        offload=True,
    )
    assert offloaded["shareable"] is False and "offloaded" in offloaded["shareable_reason"]


def test_lease_on_failed_or_missing_model(client: TestClient, models_root: Path) -> None:
    failed = load(client, source=str(models_root / "llama"), task="seq2seq-lm")
    refused = lease(client, failed["id"])
    assert refused.json()["code"] == "model_not_ready"
    assert lease(client, "nope").status_code == 404


def test_ttl_bounds(client: TestClient, models_root: Path) -> None:
    status = load(client, source=str(models_root / "gpt2"))
    assert lease(client, status["id"], ttl=0).status_code == 422
    assert lease(client, status["id"], ttl=7200).status_code == 422


def test_only_worker_keys_get_handles(make_client: ClientFactory, models_root: Path) -> None:
    client = make_client(api_keys=KEYS)
    status = load(client, headers=bearer("admin-key-123"), source=str(models_root / "gpt2"))
    for key in ("admin-key-123", "reader-key-123"):
        denied = lease(client, status["id"], headers=bearer(key))
        assert denied.status_code == 403
    granted = lease(client, status["id"], headers=bearer("worker-key-123"))
    assert granted.status_code == 201
    assert client.get("/v1/leases", headers=bearer("reader-key-123")).status_code == 200


def test_renew_and_release_need_the_secret_or_an_admin_key(
    make_client: ClientFactory, models_root: Path
) -> None:
    client = make_client(api_keys={**KEYS, "worker-key-456": ["worker"]})
    status = load(client, headers=bearer("admin-key-123"), source=str(models_root / "gpt2"))
    mine = lease(client, status["id"], headers=bearer("worker-key-123")).json()
    url = f"/v1/leases/{mine['lease_id']}"
    other_worker = bearer("worker-key-456")
    for secret in (None, "wrong-secret", "x" * 43):
        headers = {**other_worker, **({"X-Lease-Secret": secret} if secret else {})}
        for response in (
            client.post(f"{url}/renew", headers=headers),
            client.delete(url, headers=headers),
        ):
            assert response.status_code == 403, response.text
            assert response.json()["code"] == "lease_forbidden"
            assert "X-Lease-Secret" in response.json()["detail"]
    reader = client.post(f"{url}/renew", headers=bearer("reader-key-123"))
    assert reader.status_code == 403 and reader.json()["code"] == "forbidden"
    good = {**other_worker, "X-Lease-Secret": mine["secret"]}
    assert client.post(f"{url}/renew", headers=good).status_code == 200
    assert client.post(f"{url}/renew", headers=bearer("admin-key-123")).status_code == 200
    assert client.delete(url, headers=bearer("admin-key-123")).status_code == 204


def test_holder_must_be_printable_and_bounded(client: TestClient, models_root: Path) -> None:
    status = load(client, source=str(models_root / "gpt2"))
    url = f"/v1/models/{status['id']}/leases"
    for holder in ("forged\nINFO lease granted", "tab\there", "bell\x07", "x" * 129, ""):
        refused = client.post(url, json={"holder": holder, "ttl_seconds": 30})
        assert refused.status_code == 422, holder
        assert refused.json()["code"] == "invalid_spec"
    assert client.post(url, json={"holder": "trainer 7 (ü)", "ttl_seconds": 30}).status_code == 201


def test_lease_cap_per_model(make_client: ClientFactory, models_root: Path) -> None:
    client = make_client(max_leases_per_model=2)
    status = load(client, source=str(models_root / "gpt2"))
    assert [lease(client, status["id"]).status_code for _ in range(2)] == [201, 201]
    refused = lease(client, status["id"])
    assert refused.status_code == 429
    assert refused.json()["code"] == "too_many_leases"
    assert "BASEHOLD_MAX_LEASES_PER_MODEL" in refused.json()["detail"]


def test_lease_cap_per_holder(make_client: ClientFactory, models_root: Path) -> None:
    client = make_client(max_leases_per_holder=2)
    first = load(client, source=str(models_root / "gpt2"))
    second = load(client, source=str(models_root / "llama"), dtype="float32")
    assert lease(client, first["id"]).status_code == 201
    assert lease(client, second["id"]).status_code == 201
    refused = lease(client, first["id"])
    assert refused.status_code == 429
    assert refused.json()["code"] == "too_many_leases"
    assert "BASEHOLD_MAX_LEASES_PER_HOLDER" in refused.json()["detail"]
    other = client.post(
        f"/v1/models/{first['id']}/leases", json={"holder": "trainer-2", "ttl_seconds": 60}
    )
    assert other.status_code == 201


def test_restored_leases_get_at_most_one_ttl_from_now() -> None:
    now = datetime.now(timezone.utc)
    planted = [
        LeaseRow("forever", "m", "w", 30, now, now + timedelta(days=3650), "h" * 64),
        LeaseRow("huge-ttl", "m", "w", 10**9, now, now + timedelta(days=1), "h" * 64),
        LeaseRow("gone-model", "other", "w", 30, now, now + timedelta(seconds=30), "h" * 64),
    ]
    kept = {lease.id: lease for lease in LeaseTable().restore(planted, {"m"})}
    assert set(kept) == {"forever", "huge-ttl"}
    assert kept["forever"].expires_at <= datetime.now(timezone.utc) + timedelta(seconds=31)
    assert kept["huge-ttl"].ttl_seconds == MAX_TTL_SECONDS
    limit = datetime.now(timezone.utc) + timedelta(seconds=MAX_TTL_SECONDS + 1)
    assert kept["huge-ttl"].expires_at <= limit


def test_a_renewal_of_an_ended_lease_says_why_it_ended(
    make_client: ClientFactory, models_root: Path
) -> None:
    """`reason` in the 404: released by its holder, revoked by an admin (no secret),
    ended by a forced unload, expired."""
    client = make_client(api_keys=KEYS, lease_reap_seconds=0.1)
    admin, worker = bearer("admin-key-123"), bearer("worker-key-123")
    status = load(client, headers=admin, source=str(models_root / "gpt2"))

    def take(ttl: int = 60) -> dict[str, Any]:
        answer: dict[str, Any] = lease(client, status["id"], ttl, headers=worker).json()
        return answer

    def why(grant: dict[str, Any]) -> tuple[int, str | None, str]:
        headers = {**worker, "X-Lease-Secret": grant["secret"]}
        gone = client.post(f"/v1/leases/{grant['lease_id']}/renew", headers=headers)
        return gone.status_code, gone.json().get("reason"), gone.json().get("detail", "")

    released, revoked, expired, unloaded = take(), take(), take(ttl=1), take()
    with_secret = {**worker, "X-Lease-Secret": released["secret"]}
    assert (
        client.delete(f"/v1/leases/{released['lease_id']}", headers=with_secret).status_code == 204
    )
    assert client.delete(f"/v1/leases/{revoked['lease_id']}", headers=admin).status_code == 204

    def listed() -> set[str]:
        return {x["lease_id"] for x in client.get("/v1/leases", headers=admin).json()["leases"]}

    # The reaper drops it (renewing would keep it alive).
    until(lambda: expired["lease_id"] not in listed(), "the expired lease was dropped", 10)
    assert client.delete(f"/v1/models/{status['id']}?force=true", headers=admin).status_code == 204
    assert why(released)[:2] == (404, "released")
    assert why(revoked)[:2] == (404, "revoked")
    assert why(expired)[:2] == (404, "expired")
    assert why(unloaded)[:2] == (404, "unloaded")
    assert "its model was unloaded" in why(unloaded)[2]
    never = client.post("/v1/leases/lease-0000000000000000/renew", headers=worker)
    assert never.status_code == 404 and never.json()["reason"] is None


def test_a_local_load_names_the_hub_model_it_is_a_copy_of(
    client: TestClient, models_root: Path
) -> None:
    """`base_model` goes into the handle's provenance (what adapters name as their base);
    without it a local load names its directory; a hub source cannot take one."""
    base = {"hub_id": "acme/tiny-llama", "revision": "0123456789abcdef0123456789abcdef01234567"}
    source = str(models_root / "llama")
    copy = load(client, source=source, dtype="float32", base_model=base)
    plain = load(client, source=source, dtype="float32")
    assert copy["id"] != plain["id"]  # a different base is a different spec
    provenance = lease(client, copy["id"]).json()["handle"]["provenance"]
    assert provenance == {"source": source, **base}
    provenance = lease(client, plain["id"]).json()["handle"]["provenance"]
    assert provenance == {"source": source, "hub_id": None, "revision": None}
    hub = client.post("/v1/models", json={"source": "acme/x", "base_model": base})
    assert hub.status_code == 400 and "Drop base_model" in hub.json()["detail"]
    bad = client.post("/v1/models", json={"source": source, "base_model": {"hub_id": "../x"}})
    assert bad.status_code == 422


def test_lease_cap_per_key_and_model(make_client: ClientFactory, models_root: Path) -> None:
    """One worker key took every lease of a model by varying `holder`: now a key holds at
    most BASEHOLD_MAX_LEASES_PER_KEY leases on one model; other keys and admins still get
    theirs, and a released lease frees its slot."""
    keys = {**KEYS, "worker-key-456": ["worker"], "operator-key-789": ["admin", "worker"]}
    client = make_client(api_keys=keys, max_leases_per_key=2)
    admin, worker, other = (
        bearer("admin-key-123"),
        bearer("worker-key-123"),
        bearer("worker-key-456"),
    )
    first = load(client, headers=admin, source=str(models_root / "gpt2"))["id"]
    second = load(client, headers=admin, source=str(models_root / "llama"), dtype="float32")["id"]

    def take(model_id: str, holder: str, headers: dict[str, str]) -> Answer:
        body = {"holder": holder, "ttl_seconds": 60}
        return client.post(f"/v1/models/{model_id}/leases", json=body, headers=headers)

    granted = [take(first, f"rank-{i}", worker) for i in range(2)]
    assert [g.status_code for g in granted] == [201, 201]
    refused = take(first, "rank-2", worker)
    body = refused.json()
    assert (refused.status_code, body["code"]) == (429, "too_many_leases")
    assert "BASEHOLD_MAX_LEASES_PER_KEY" in body["detail"] and "Release" in body["detail"]
    assert "worker-key-123" not in refused.text  # the key is never echoed
    assert take(second, "rank-2", worker).status_code == 201  # per model
    assert take(first, "rank-2", other).status_code == 201  # per key
    operator = bearer("operator-key-789")  # an admin key may lease too: not capped
    assert [take(first, f"admin-{i}", operator).status_code for i in range(3)] == [201] * 3
    lease_id, secret = granted[0].json()["lease_id"], granted[0].json()["secret"]
    released = client.delete(f"/v1/leases/{lease_id}", headers={**worker, "X-Lease-Secret": secret})
    assert released.status_code == 204
    assert take(first, "rank-3", worker).status_code == 201


def test_the_per_key_cap_holds_under_concurrent_grants() -> None:
    """Checked and taken under one lock: 32 threads of one key never get more than the cap."""
    table = LeaseTable()
    granted: list[str] = []
    refused: list[str] = []

    def take(i: int) -> None:
        try:
            lease, _ = table.grant("m", f"rank-{i}", 60, key="k1", max_per_key=4)
            granted.append(lease.id)
        except TooManyLeases as exc:
            refused.append(exc.code)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 4 and refused == ["too_many_leases"] * 28
    assert table.count_key("m", "k1") == 4 and table.count_key("other", "k1") == 0
    table.grant("m", "x", 60, key="k2", max_per_key=4)  # another key
    table.grant("m", "x", 60)  # no key: no cap
    table.release(granted[0])
    assert table.count_key("m", "k1") == 3
    table.grant("m", "rank-again", 60, key="k1", max_per_key=4)


def test_restored_leases_still_count_for_their_key(tmp_path: Path) -> None:
    """The per-key cap outlives a restart: the leases a key held come back with it."""
    db = StateDB.open(tmp_path)
    table = LeaseTable()
    table.persist_to(db)
    for i in range(4):
        table.grant("m", f"rank-{i}", 60, key="k1", max_per_key=4)
    db.close()
    reopened = StateDB.open(tmp_path)
    restarted = LeaseTable()
    restarted.persist_to(reopened)
    assert len(restarted.restore(reopened.leases(), {"m"})) == 4
    assert restarted.count_key("m", "k1") == 4  # was 0: the keys lived in memory only
    with pytest.raises(TooManyLeases):
        restarted.grant("m", "rank-4", 60, key="k1", max_per_key=4)
    reopened.close()
