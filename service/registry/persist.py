"""The registry's transitions, written through to the state database.

A row exists while a model is meant to be held: created when queued, updated as it loads,
deleted when the user unloads it, a load is cancelled, a load fails or the model is
evicted. A shutdown or crash leaves the rows as they are, so the next start restores them.
"""

from __future__ import annotations

import logging

from service.registry.record import ModelRecord
from service.registry.states import State
from service.state.database import ModelRow, StateDB

log = logging.getLogger("basehold.state")

_FORGET = frozenset({State.UNLOADING, State.CANCELLED, State.FAILED})


class Persistence:
    def __init__(self, db: StateDB) -> None:
        self._db = db

    def on_transition(self, record: ModelRecord, previous: State, target: State) -> None:
        if previous == target:
            return
        if previous == State.GONE:
            self._db.put_model(
                ModelRow(
                    id=record.id,
                    name=record.name,
                    spec=record.spec.model_dump(mode="json"),
                    spec_key=record.key,
                    state=target.value,
                    queued_at=record.queued_at,
                    last_used_at=record.last_used_at,
                )
            )
        elif target in (State.LOADING, State.READY):
            self._db.set_model_state(record.id, target.value)
        elif target in _FORGET:
            self._db.delete_model(record.id)

    def touch(self, record: ModelRecord) -> None:
        self._db.touch_model(record.id, record.last_used_at)

    def forget(self, model_id: str) -> None:
        self._db.delete_model(model_id)
