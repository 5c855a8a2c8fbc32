"""POST /v1/estimate is read-only: a flood of them is bounded (each runs a helper process),
and a read key never borrows the server's hub token."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from service.common.errors import TooManyRequests
from service.serving.api.slots import Slots
from tests.conftest import ClientFactory, app_of, until
from tests.hub import LocalHub


def test_estimates_beyond_the_slots_and_the_queue_answer_429(
    make_client: ClientFactory, hub: LocalHub
) -> None:
    client = make_client(hf_endpoint=hub.url, max_concurrent_estimates=1)
    slots: Slots = app_of(client).state.estimate_slots
    release = threading.Event()
    hub.faults.held["config.json"] = release  # the estimate holds its slot meanwhile
    answers: list[Any] = []

    def estimate() -> None:
        answers.append(client.post("/v1/estimate", json={"source": "acme/llama"}))

    first = threading.Thread(target=estimate)
    first.start()
    until(lambda: hub.streaming >= 1, "the first estimate reads config.json", 60)
    second = threading.Thread(target=estimate)
    second.start()
    until(lambda: slots.waiting == 1, "the second estimate waits for the slot", 30)

    refused = client.post("/v1/estimate", json={"source": "acme/llama"})
    assert refused.status_code == 429, refused.text
    body: dict[str, Any] = refused.json()
    assert refused.headers["content-type"] == "application/problem+json"
    assert body["code"] == "too_many_requests"
    assert "try again" in body["detail"]

    release.set()
    first.join(60)
    second.join(60)
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert slots.busy == 0


def test_a_waiting_call_takes_the_slot_when_it_frees() -> None:
    slots = Slots("estimates", running=1, waiting=1, wait_seconds=30)
    release = threading.Event()
    order: list[str] = []

    def hold() -> None:
        with slots.slot():
            order.append("first")
            release.wait(30)

    def wait_then_run() -> None:
        with slots.slot():
            order.append("second")

    holder = threading.Thread(target=hold)
    holder.start()
    until(lambda: slots.busy == 1, "the first call runs")
    waiter = threading.Thread(target=wait_then_run)
    waiter.start()
    until(lambda: slots.waiting == 1, "the second call waits")
    try:
        with slots.slot():
            raise AssertionError("a third call found room in a full queue")
    except TooManyRequests as exc:
        assert exc.code == "too_many_requests"
    release.set()
    holder.join(30)
    waiter.join(30)
    assert order == ["first", "second"]
    assert (slots.busy, slots.waiting) == (0, 0)


def test_a_call_that_waits_past_its_deadline_is_refused() -> None:
    slots = Slots("estimates", running=1, waiting=4, wait_seconds=0.05)
    with slots.slot():
        try:
            with slots.slot():
                raise AssertionError("ran beside a call holding the only slot")
        except TooManyRequests:
            pass
        assert slots.waiting == 0
    with slots.slot():  # the slot is free again
        assert slots.busy == 1


def test_a_read_key_estimates_a_hub_source_with_its_own_token_only(
    make_client: ClientFactory, hub: LocalHub, models_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add("acme/private", models_root / "llama", private=True, token="hf_server_token")
    monkeypatch.setenv("HF_TOKEN", "hf_server_token")  # the server's own token
    keys = {"admin-key-123": ["admin"], "reader-key-123": ["read"]}
    client = make_client(hf_endpoint=hub.url, api_keys=keys)
    body = {"source": "acme/private"}

    def estimate(key: str, **headers: str) -> Any:
        return client.post(
            "/v1/estimate", json=body, headers={"Authorization": f"Bearer {key}", **headers}
        )

    refused = estimate("reader-key-123")
    assert refused.status_code == 403, refused.text
    assert refused.json()["code"] == "gated_or_unauthorized"
    assert "X-HF-Token" in refused.json()["detail"]
    own = estimate("reader-key-123", **{"X-HF-Token": "hf_server_token"})
    assert own.status_code == 200, own.text
    admin = estimate("admin-key-123")
    assert admin.status_code == 200, admin.text
    assert admin.json()["total_bytes"] == own.json()["total_bytes"]
