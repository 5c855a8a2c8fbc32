"""The explicit state table. Every transition goes through `Registry._transition`."""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    QUEUED = "queued"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    CANCELLED = "cancelled"
    GONE = "gone"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.LOADING, State.CANCELLED, State.FAILED}),
    State.LOADING: frozenset({State.READY, State.FAILED, State.CANCELLED}),
    State.READY: frozenset({State.UNLOADING, State.FAILED}),  # failed: its runner died
    State.FAILED: frozenset({State.GONE}),
    State.UNLOADING: frozenset({State.GONE}),
    State.CANCELLED: frozenset({State.GONE}),
    State.GONE: frozenset(),
}

# States in which an identical request is answered with the existing record.
ACTIVE = frozenset({State.QUEUED, State.LOADING, State.READY})


class IllegalTransition(RuntimeError):
    def __init__(self, current: State, target: State) -> None:
        super().__init__(f"illegal transition {current.value} -> {target.value}")


def check_transition(current: State, target: State) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(current, target)
