"""What a starting service does with its state: clean what a crashed instance left, open
the database, write through from now on, and restore (or forget) what it holds.

A successor (a handover, or a start by the keeper after a crash) keeps the models it was
handed at once, before it holds the state lock: the predecessor froze the database and
writes nothing more. The loads it must start again (models held by a runner, loads that
were in progress) wait for the lock: the predecessor lets go of those first, so no model
is ever held twice."""

from __future__ import annotations

import logging
import threading

from service.common.protocol.wire import close_fds
from service.serving.handover.taker import Handed
from service.serving.leases.leases import LeaseTable
from service.serving.registry.persist import Persistence
from service.serving.registry.record import Adopted
from service.serving.registry.registry import Registry
from service.serving.settings import Settings
from service.serving.state.database import StateDB
from service.serving.state.leftovers import clean_offload
from service.serving.state.lock import StateDirLocked, StateLock
from service.serving.state.snapshots import FOLDER as SNAPSHOTS
from service.serving.state.snapshots import Snapshots, drop_all

log = logging.getLogger("basehold")

LOCK_WAIT = 60.0  # seconds between two log lines while a predecessor holds on to the lock


def start_state(
    settings: Settings,
    lock: StateLock,
    registry: Registry,
    table: LeaseTable,
    handed: Handed | None = None,
    snapshots: Snapshots | None = None,
) -> StateDB:
    """Open and restore the state. Without `handed`, the caller holds the lock; with it,
    the loads to start again wait for it: `follow_predecessor` starts them once it is
    free. `snapshots`: those of models no longer recorded are removed (the registry takes
    the others, in place of their loads)."""
    adopted = {
        model_id: Adopted(
            taken.offered.load_id,
            taken.offered.facts,
            taken.fds,
            taken.offered.started_at,
            taken.offered.ready_at,
            taken.offered.runner,
        )
        for model_id, taken in (handed.models.items() if handed is not None else ())
    }
    if handed is not None:
        handed.models.clear()  # the registry's from now on
    try:
        if handed is None:
            _clean(settings, lock)
        if handed is None and not settings.snapshots:
            drop_all(settings.state_dir / SNAPSHOTS)
        fresh = snapshots if handed is None else None  # a predecessor may be writing one
        db = _open(settings, registry, table, adopted, start=handed is None, snapshots=fresh)
    finally:
        close_fds([fd for left in adopted.values() for fd in left.fds])  # not restored
    return db


def follow_predecessor(settings: Settings, lock: StateLock, registry: Registry) -> None:
    """A successor's thread that takes the state lock once the predecessor let go, then
    starts the loads it did not hand over."""
    threading.Thread(
        target=_after_predecessor, args=(settings, lock, registry), name="state-lock", daemon=True
    ).start()


def _clean(settings: Settings, lock: StateLock, keep: frozenset[str] = frozenset()) -> None:
    """`keep`: the loads held already (a runner handed over may use its offload folder)."""
    lock.verify()  # the folder checked and locked is still the one its path names
    offload = clean_offload(settings.offload_dir, keep)
    if offload:
        log.info("removed %d offload folder(s) a previous instance left", offload)


def _after_predecessor(settings: Settings, lock: StateLock, registry: Registry) -> None:
    """Take the lock once the predecessor let go (it ends its runners and loads first),
    then start the loads it did not hand over."""
    while True:
        try:
            lock.acquire(wait=LOCK_WAIT)
            break
        except StateDirLocked as exc:
            log.error("%s; its runner-held models and loads start once it lets go", exc)
        except Exception:  # the folder changed under us: nothing else may start here
            log.exception("cannot take the state lock; the loads to start again wait")
            return
    try:
        _clean(settings, lock, frozenset(r.load_id for r in registry.records()))
    except Exception:
        log.exception("could not clean what the predecessor left; going on")
    registry.start_deferred()


def _open(
    settings: Settings,
    registry: Registry,
    table: LeaseTable,
    adopted: dict[str, Adopted],
    *,
    start: bool,
    snapshots: Snapshots | None = None,
) -> StateDB:
    db = StateDB.open(settings.state_dir)
    registry.writer.batch = db.batch  # a flush of many writes commits once
    registry.persist_to(Persistence(db, registry.writer))
    table.persist_to(db)
    if not settings.restore:
        forgot_models, forgot_leases = db.forget_all()
        log.warning(
            "BASEHOLD_RESTORE=false: starting empty; forgot %d recorded model(s) and %d "
            "lease(s) in %s",
            forgot_models,
            forgot_leases,
            db.path,
        )
        if snapshots is not None:
            snapshots.keep_only(())
        return db
    rows = db.models()
    if snapshots is not None and (removed := snapshots.keep_only(row.id for row in rows)):
        log.info("removed the snapshots of %d model(s) no longer recorded", removed)
    with registry.writer.deferred():  # one commit for the restore's writes
        leases = table.restore(db.leases(), {row.id for row in rows})
        restored = registry.restore(rows, dict(adopted), start=start)
    adopted.clear()  # the registry kept or closed them
    if restored or leases:
        log.info(
            "restoring %d model(s) (most recently used first: %s) and %d lease(s) from %s",
            len(restored),
            ", ".join(r.id for r in restored) or "-",
            len(leases),
            db.path,
        )
    return db
