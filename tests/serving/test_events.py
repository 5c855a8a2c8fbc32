"""service.serving.events: what a subscriber gets after the last event it had."""

from __future__ import annotations

from service.serving.events import EventBus


def test_since_gives_the_newer_events_oldest_first_even_past_the_buffer() -> None:
    bus = EventBus(capacity=4)
    for n in range(6):
        bus.publish("progress", {"n": n})  # ids 1..6; 3..6 kept
    assert [e.data["n"] for e in bus.since(4)] == [4, 5]
    assert [e.data["n"] for e in bus.since(0)] == [2, 3, 4, 5]  # what is left of them
    assert bus.since(bus.last_id) == []
    assert [e.id for e in bus.since(-1)] == [3, 4, 5, 6]
