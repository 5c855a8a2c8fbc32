"""Lines anyone can provoke: one per kind a window, and a count of what was left out."""

from __future__ import annotations

import logging

import pytest

from service.serving.socket.throttled_log import ThrottledLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_kind_a_window_then_the_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttled = ThrottledLog(logging.getLogger("basehold.test.throttled"), 60.0, clock)
    with caplog.at_level(logging.WARNING, "basehold.test.throttled"):
        for i in range(1000):
            throttled.warning("busy", "turned away %s", i)
            throttled.warning("cut off", "cut off %s", i)
        throttled.flush_due()  # the window is not over: nothing yet
        assert [r.getMessage() for r in caplog.records] == ["turned away 0", "cut off 0"]
        clock.now += 60
        throttled.warning("busy", "turned away %s", "again")
        throttled.flush_due()
        clock.now += 60
        throttled.flush_due()
        throttled.flush_due()  # nothing left out since: no line
    assert [r.getMessage() for r in caplog.records] == [
        "turned away 0",
        "cut off 0",
        "turned away again (and 999 more like it left out of the log)",
        "999 more like 'cut off' left out of the log in the last 60 s",
    ]
