"""POST /v1/estimate runs a helper process per request: a flood of them is bounded."""

from __future__ import annotations

import threading
from typing import Any

from service.api.slots import Slots
from service.errors import TooManyRequests
from tests.conftest import ClientFactory, app_of, until
from tests.hub import LocalHub


def test_estimates_beyond_the_slots_and_the_queue_answer_429(
    make_client: ClientFactory, hub: LocalHub
) -> None:
    client = make_client(hf_endpoint=hub.url, max_concurrent_estimates=1)
    slots: Slots = app_of(client).state.estimate_slots
    hub.faults.rate = 200  # config.json trickles in: the estimate holds its slot meanwhile
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

    hub.faults.rate = None
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
