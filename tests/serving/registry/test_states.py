from __future__ import annotations

import pytest

from service.serving.registry.states import TRANSITIONS, IllegalTransition, State, check_transition


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (State.QUEUED, State.LOADING),
        (State.LOADING, State.READY),
        (State.LOADING, State.FAILED),
        (State.LOADING, State.CANCELLED),
        (State.READY, State.UNLOADING),
        (State.UNLOADING, State.GONE),
        (State.FAILED, State.GONE),
        (State.CANCELLED, State.GONE),
    ],
)
def test_allowed(current: State, target: State) -> None:
    check_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (State.QUEUED, State.READY),
        (State.READY, State.LOADING),
        (State.GONE, State.QUEUED),
        (State.FAILED, State.READY),
        (State.UNLOADING, State.READY),
    ],
)
def test_refused(current: State, target: State) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(current, target)
