"""The state database: one SQLite file (WAL) in BASEHOLD_STATE_DIR.

It holds what a restarted service needs to hold the same models again: normalized specs,
ids, names, timestamps, last use, and leases (only a hash of any secret). Never a token.
Schema changes are numbered migrations; a database that cannot be read is moved aside
(never overwritten) and the service starts empty.

Every write happens on the caller's thread with a short transaction. Writes must never run
on the event loop: `_off_loop` refuses them there, so a route that would stall every
request behind a disk write fails loudly in tests instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from service.common.private_dir import FileUnsafe, open_private

log = logging.getLogger("basehold.state")

FILENAME = "basehold.sqlite3"

# Migration N takes the schema from version N-1 to N. Append; never edit a shipped one.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE models (
            id TEXT PRIMARY KEY,
            name TEXT,
            spec TEXT NOT NULL,
            spec_key TEXT NOT NULL,
            state TEXT NOT NULL,
            queued_at TEXT NOT NULL,
            last_used_at TEXT NOT NULL
        )""",
        """CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            model_id TEXT NOT NULL,
            holder TEXT NOT NULL,
            ttl_seconds INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            secret_hash TEXT
        )""",
        "CREATE INDEX leases_by_model ON leases (model_id)",
    ),
    # The fingerprint of the API key that took a lease (never the key): the per-key cap
    # (BASEHOLD_MAX_LEASES_PER_KEY) counts restored leases too.
    2: ("ALTER TABLE leases ADD COLUMN key_fingerprint TEXT",),
    # Other names a model answers to: a POST of a held spec under a new name (JSON list).
    3: ("ALTER TABLE models ADD COLUMN aliases TEXT NOT NULL DEFAULT '[]'",),
}
SCHEMA_VERSION = max(MIGRATIONS)


class StateError(RuntimeError):
    """The state directory cannot be used (newer schema, unwritable); the message says why."""


@dataclass(frozen=True)
class ModelRow:
    id: str
    name: str | None
    spec: dict[str, object]
    spec_key: str
    state: str
    queued_at: datetime
    last_used_at: datetime
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class LeaseRow:
    id: str
    model_id: str
    holder: str
    ttl_seconds: int
    created_at: datetime
    expires_at: datetime
    secret_hash: str | None
    key: str | None = None  # the fingerprint of the API key that took it (None: no key)


def _off_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError("a state database write ran on the event loop; run it in a thread")


def _private_file(path: Path) -> None:
    """Create the database file 0600 (SQLite gives its -wal and -shm files the same mode),
    or take group and other bits off one that has them: it holds lease secrets' hashes and
    specs whose restore runs loads."""
    try:
        os.close(open_private(path, "BASEHOLD_STATE_DIR"))
    except FileUnsafe as exc:
        raise StateError(str(exc)) from None
    except OSError as exc:
        raise StateError(
            f"cannot open {path} ({exc.strerror}); it must be a regular file of this user. "
            "Remove it or point BASEHOLD_STATE_DIR elsewhere."
        ) from None


def _connect(path: Path) -> sqlite3.Connection:
    _private_file(path)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a committed transaction survives a process kill (SIGKILL, OOM);
    # only a power loss may lose the last ones.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _version(conn: sqlite3.Connection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    current = _version(conn)
    if current > SCHEMA_VERSION:
        raise StateError(
            f"{path} has schema version {current}, newer than this basehold knows "
            f"({SCHEMA_VERSION}). Run the newer basehold, or point BASEHOLD_STATE_DIR elsewhere."
        )
    for number in range(current + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("state database %s migrated to schema %d", path, number)


def _check(conn: sqlite3.Connection) -> None:
    result = conn.execute("PRAGMA quick_check").fetchone()
    if result is None or result[0] != "ok":
        raise sqlite3.DatabaseError(f"quick_check: {result[0] if result else 'no answer'}")


def _move_aside(path: Path, reason: Exception) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            part.rename(Path(f"{target}{suffix}"))
    log.error(
        "STATE DATABASE UNREADABLE: %s (%s). Moved it aside to %s and starting EMPTY: no "
        "model or lease is restored. Inspect or delete the moved file.",
        path,
        reason,
        target,
    )
    return target


def _model_row(r: tuple[Any, ...]) -> ModelRow:
    spec = json.loads(r[2])
    if not isinstance(spec, dict):
        raise ValueError("the spec is not a JSON object")
    aliases = json.loads(r[7])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ValueError("the aliases are not a JSON list of names")
    return ModelRow(
        id=str(r[0]),
        name=r[1],
        spec=spec,
        spec_key=str(r[3]),
        state=str(r[4]),
        queued_at=_aware(r[5]),
        last_used_at=_aware(r[6]),
        aliases=tuple(aliases),
    )


def _lease_row(r: tuple[Any, ...]) -> LeaseRow:
    return LeaseRow(
        id=str(r[0]),
        model_id=str(r[1]),
        holder=str(r[2]),
        ttl_seconds=int(r[3]),
        created_at=_aware(r[4]),
        expires_at=_aware(r[5]),
        secret_hash=r[6],
        key=r[7],
    )


def _aware(value: object) -> datetime:
    """An ISO 8601 time with a zone (naive ones are read as UTC)."""
    when = datetime.fromisoformat(str(value))
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


R = TypeVar("R")


# How one write begins, ends and is undone: a transaction of its own, or a savepoint in a
# `batch`'s transaction.
_ALONE = ("BEGIN IMMEDIATE", ("COMMIT",), ("ROLLBACK",))
_IN_BATCH = ("SAVEPOINT write", ("RELEASE write",), ("ROLLBACK TO write", "RELEASE write"))


class StateDB:
    """Rows of held models and leases. Thread-safe; every write is one transaction."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.RLock()  # held through a `batch`
        self._frozen = False
        self._batching = False
        self.moved_aside: Path | None = None

    @classmethod
    def open(cls, directory: Path) -> StateDB:
        path = directory / FILENAME
        moved: Path | None = None
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(path)
            _check(conn)
            _migrate(conn, path)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            moved = _move_aside(path, exc)
            conn = _connect(path)
            _migrate(conn, path)
        db = cls(conn, path)
        db.moved_aside = moved
        return db

    def freeze(self) -> None:
        """The process is stopping: what is recorded stays as it is (shutdown unloads every
        model and revokes leases, and none of that may reach the database)."""
        with self._lock:
            self._frozen = True

    def thaw(self) -> None:
        """A handover that did not happen: write through again (the caller rewrites what
        changed meanwhile)."""
        with self._lock:
            self._frozen = False

    def close(self) -> None:
        with self._lock:
            self._end_batch()
            self._frozen = True
            self._conn.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """The writes this thread makes inside run in one transaction, each in a savepoint
        of its own (one that fails is undone alone): one commit for many writes, e.g. a
        restore's. Other threads' writes and reads wait for its end."""
        _off_loop()
        with self._lock:
            if self._frozen or self._batching:
                yield
                return
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:  # each write tries on its own then
                log.warning("state database: cannot begin a batch of writes (%s)", exc)
                yield
                return
            self._batching = True
            try:
                yield
            finally:
                self._end_batch()

    def _end_batch(self) -> None:
        """Commit a batch (also one this thread froze meanwhile: what it wrote before was
        decided before)."""
        if self._batching:
            self._batching = False
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                log.exception("state database: a batch of writes failed; the next start may differ")
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")

    def _write(self, *statements: tuple[str, Sequence[object]]) -> list[int]:
        """Run `statements` as one transaction (a savepoint within a `batch`); returns
        each one's row count. Nothing is written once frozen."""
        _off_loop()
        with self._lock:
            if self._frozen:
                return [0] * len(statements)
            begin, done, undo = _IN_BATCH if self._batching else _ALONE
            self._conn.execute(begin)
            try:
                counts = [self._conn.execute(sql, params).rowcount for sql, params in statements]
            except BaseException:
                for sql in undo:
                    self._conn.execute(sql)
                raise
            for sql in done:
                self._conn.execute(sql)
            return counts

    # -- models ------------------------------------------------------------------------
    def put_model(self, row: ModelRow) -> None:
        self._write(
            (
                "INSERT INTO models (id, name, spec, spec_key, state, queued_at, last_used_at, "
                "aliases) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "name=excluded.name, spec=excluded.spec, spec_key=excluded.spec_key, "
                "state=excluded.state, queued_at=excluded.queued_at, "
                "last_used_at=excluded.last_used_at, aliases=excluded.aliases",
                (
                    row.id,
                    row.name,
                    json.dumps(row.spec, sort_keys=True),
                    row.spec_key,
                    row.state,
                    row.queued_at.isoformat(),
                    row.last_used_at.isoformat(),
                    json.dumps(list(row.aliases)),
                ),
            )
        )

    def set_model_state(self, model_id: str, state: str) -> None:
        self._write(("UPDATE models SET state = ? WHERE id = ?", (state, model_id)))

    def touch_model(self, model_id: str, when: datetime) -> None:
        self._write(
            ("UPDATE models SET last_used_at = ? WHERE id = ?", (when.isoformat(), model_id))
        )

    def delete_model(self, model_id: str) -> None:
        self._write(("DELETE FROM models WHERE id = ?", (model_id,)))

    def models(self) -> list[ModelRow]:
        """Most recently used first. A row that cannot be read is moved aside."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, name, spec, spec_key, state, queued_at, last_used_at, aliases "
                "FROM models ORDER BY last_used_at DESC"
            ).fetchall()
        return self._readable("models", rows, _model_row)

    # -- leases ------------------------------------------------------------------------
    def put_lease(self, row: LeaseRow) -> None:
        self._write(
            (
                "INSERT OR REPLACE INTO leases (id, model_id, holder, ttl_seconds, created_at, "
                "expires_at, secret_hash, key_fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.id,
                    row.model_id,
                    row.holder,
                    row.ttl_seconds,
                    row.created_at.isoformat(),
                    row.expires_at.isoformat(),
                    row.secret_hash,
                    row.key,
                ),
            )
        )

    def delete_leases(self, lease_ids: list[str]) -> None:
        self._write(*(("DELETE FROM leases WHERE id = ?", (i,)) for i in lease_ids))

    def leases(self) -> list[LeaseRow]:
        """A row that cannot be read is moved aside."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, model_id, holder, ttl_seconds, created_at, expires_at, secret_hash, "
                "key_fingerprint FROM leases ORDER BY created_at"
            ).fetchall()
        return self._readable("leases", rows, _lease_row)

    def _readable(
        self, table: str, rows: list[tuple[Any, ...]], parse: Callable[[tuple[Any, ...]], R]
    ) -> list[R]:
        """Parse `rows`; one that cannot be parsed (a spec that is not JSON, a date that is
        not ISO 8601) is written to a file beside the database, deleted from `table`, and
        logged loudly, so it never stops a start."""
        parsed: list[R] = []
        for row in rows:
            try:
                parsed.append(parse(row))
            except (ValueError, TypeError) as exc:
                self._set_aside(table, row, exc)
        return parsed

    def _set_aside(self, table: str, row: tuple[Any, ...], reason: Exception) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.bad-{table}-{stamp}-{uuid.uuid4().hex[:8]}")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"table": table, "row": [str(v) for v in row]}, fh)
        self._write((f"DELETE FROM {table} WHERE id = ?", (row[0],)))
        log.error(
            "STATE DATABASE ROW UNREADABLE: a row of %s (id %r) could not be read (%s). Moved "
            "it aside to %s; it is not restored. Inspect or delete that file.",
            table,
            str(row[0])[:64],
            reason,
            target,
        )

    def forget_all(self) -> tuple[int, int]:
        """Drop every model and lease row (BASEHOLD_RESTORE=false); returns the counts."""
        models, leases = self._write(("DELETE FROM models", ()), ("DELETE FROM leases", ()))
        return models, leases
