"""The registry's transitions, written through to the state database.

A row exists while a model is meant to be held: created when queued, updated as it loads,
deleted when the user unloads it, a load is cancelled, a load fails or the model is
evicted. A shutdown or crash leaves the rows as they are, so the next start restores them.
"""

from __future__ import annotations

import logging

from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State
from service.serving.state.database import ModelRow, StateDB
from service.serving.state.writer import OrderedWriter

log = logging.getLogger("basehold.state")

_FORGET = frozenset({State.UNLOADING, State.CANCELLED, State.FAILED})


class Persistence:
    """Called under the registry's lock: each write is captured now (the values as they
    are) and queued on `writer`, which runs it once the lock is let go."""

    def __init__(self, db: StateDB, writer: OrderedWriter) -> None:
        self._db = db
        self._writer = writer

    def on_transition(self, record: ModelRecord, previous: State, target: State) -> None:
        if previous == target:
            return
        db = self._db
        if previous == State.GONE:
            self._put(record, target)
        elif target in (State.LOADING, State.READY):
            model_id, state = record.id, target.value
            self._writer.submit(lambda: db.set_model_state(model_id, state))
        elif target in _FORGET:
            model_id = record.id
            self._writer.submit(lambda: db.delete_model(model_id))

    def rewrite(self, record: ModelRecord) -> None:
        """The record's spec or names changed (pinned, an alias added or dropped): rewrite
        its row."""
        self._put(record, record.state)

    def _put(self, record: ModelRecord, state: State) -> None:
        db = self._db
        row = ModelRow(
            id=record.id,
            name=record.name,
            spec=record.spec.model_dump(mode="json"),
            spec_key=record.key,
            state=state.value,
            queued_at=record.queued_at,
            last_used_at=record.last_used_at,
            aliases=tuple(record.aliases),
        )
        self._writer.submit(lambda: db.put_model(row))

    def touch(self, record: ModelRecord) -> None:
        db, model_id, when = self._db, record.id, record.last_used_at
        self._writer.submit(lambda: db.touch_model(model_id, when))

    def recorded(self) -> set[str]:
        """The ids the database holds a row for (a read, now)."""
        return {row.id for row in self._db.models()}

    def forget(self, model_id: str) -> None:
        db = self._db
        self._writer.submit(lambda: db.delete_model(model_id))
