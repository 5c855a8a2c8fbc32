"""The state database on real SQLite: migrations, rows, corruption, the event-loop rule."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from service.serving.state.database import (
    FILENAME,
    MIGRATIONS,
    SCHEMA_VERSION,
    LeaseRow,
    ModelRow,
    StateDB,
    StateError,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def model_row(model_id: str, used: datetime = NOW) -> ModelRow:
    return ModelRow(
        id=model_id,
        name=model_id,
        spec={"source": "/models/x", "dtype": "float32"},
        spec_key="k" * 64,
        state="queued",
        queued_at=NOW,
        last_used_at=used,
    )


def lease_row(lease_id: str, model_id: str) -> LeaseRow:
    return LeaseRow(lease_id, model_id, "w", 30, NOW, NOW + timedelta(seconds=30), "h" * 64)


def test_fresh_database_is_wal_and_at_the_latest_schema(tmp_path: Path) -> None:
    db = StateDB.open(tmp_path)
    db.close()
    conn = sqlite3.connect(tmp_path / FILENAME)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_rows_round_trip_most_recently_used_first(tmp_path: Path) -> None:
    db = StateDB.open(tmp_path)
    db.put_model(model_row("old", NOW - timedelta(hours=1)))
    db.put_model(model_row("new"))
    db.set_model_state("old", "ready")
    db.touch_model("old", NOW + timedelta(hours=1))
    db.put_lease(lease_row("l1", "old"))
    db.close()
    reopened = StateDB.open(tmp_path)
    assert [r.id for r in reopened.models()] == ["old", "new"]
    assert reopened.models()[0].state == "ready"
    assert reopened.models()[0].spec == {"source": "/models/x", "dtype": "float32"}
    assert reopened.leases() == [lease_row("l1", "old")]
    reopened.delete_leases(["l1"])
    reopened.delete_model("new")
    assert [r.id for r in reopened.models()] == ["old"] and reopened.leases() == []
    assert reopened.forget_all() == (1, 0)


def test_frozen_database_writes_nothing(tmp_path: Path) -> None:
    db = StateDB.open(tmp_path)
    db.put_model(model_row("kept"))
    db.freeze()
    db.delete_model("kept")
    db.put_model(model_row("never"))
    assert [r.id for r in db.models()] == ["kept"]


def test_writes_on_the_event_loop_are_refused(tmp_path: Path) -> None:
    db = StateDB.open(tmp_path)

    async def on_loop() -> None:
        db.put_model(model_row("x"))

    with pytest.raises(RuntimeError, match="event loop"):
        asyncio.run(on_loop())

    async def in_thread() -> None:
        await asyncio.to_thread(db.put_model, model_row("y"))

    asyncio.run(in_thread())
    assert [r.id for r in db.models()] == ["y"]


def test_corrupt_database_is_moved_aside_not_overwritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"this is not an sqlite database" * 100
    (tmp_path / FILENAME).write_bytes(garbage)
    db = StateDB.open(tmp_path)
    assert db.moved_aside is not None and db.moved_aside.read_bytes() == garbage
    assert db.models() == []
    assert "STATE DATABASE UNREADABLE" in caplog.text and str(db.moved_aside) in caplog.text


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    StateDB.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / FILENAME)
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer than this basehold"):
        StateDB.open(tmp_path)
    assert (tmp_path / FILENAME).exists()  # left as it is


def test_the_database_is_created_private_and_made_private(tmp_path: Path) -> None:
    StateDB.open(tmp_path).close()
    for name in (FILENAME, f"{FILENAME}-wal", f"{FILENAME}-shm"):
        path = tmp_path / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    (tmp_path / FILENAME).chmod(0o644)
    StateDB.open(tmp_path).close()
    assert stat.S_IMODE((tmp_path / FILENAME).stat().st_mode) == 0o600


def test_a_symlinked_database_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.sqlite3"
    StateDB.open(tmp_path).close()
    (tmp_path / FILENAME).rename(elsewhere)
    (tmp_path / FILENAME).symlink_to(elsewhere)
    with pytest.raises(StateError, match="never a symlink"):
        StateDB.open(tmp_path)


def test_an_unreadable_row_is_moved_aside_and_the_rest_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = StateDB.open(tmp_path)
    db.put_model(model_row("good"))
    db.put_lease(lease_row("l-good", "good"))
    db.close()
    conn = sqlite3.connect(tmp_path / FILENAME)
    with conn:
        conn.execute(
            "INSERT INTO models VALUES ('bad', 'bad', '{not json', 'k', 'ready', ?, ?, '[]')",
            (NOW.isoformat(), NOW.isoformat()),
        )
        conn.execute(
            "INSERT INTO models VALUES ('list', 'list', '[1]', 'k', 'ready', ?, ?, '[]')",
            (NOW.isoformat(), NOW.isoformat()),
        )
        conn.execute(
            "INSERT INTO leases VALUES ('l-bad', 'good', 'w', 30, 'yesterday', 'never', NULL, NULL)"
        )
    conn.close()
    db = StateDB.open(tmp_path)
    assert [r.id for r in db.models()] == ["good"]
    assert [r.id for r in db.leases()] == ["l-good"]
    assert "STATE DATABASE ROW UNREADABLE" in caplog.text
    aside = sorted(tmp_path.glob(f"{FILENAME}.bad-*"))
    assert len(aside) == 3
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in aside)
    assert any("{not json" in p.read_text() for p in aside)
    # Gone from the database: the next start reads it clean, logging nothing.
    caplog.clear()
    assert [r.id for r in db.models()] == ["good"] and "UNREADABLE" not in caplog.text


def test_a_schema_1_database_is_migrated_and_keeps_its_leases(tmp_path: Path) -> None:
    """A state dir written by the basehold before lease keys were kept: its leases come back
    (with no key), and a key stored from now on reads back."""
    conn = sqlite3.connect(tmp_path / FILENAME)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    conn.execute(
        "INSERT INTO leases VALUES ('old', 'm', 'w', 30, ?, ?, ?)",
        (NOW.isoformat(), (NOW + timedelta(seconds=30)).isoformat(), "h" * 64),
    )
    conn.commit()
    conn.close()
    db = StateDB.open(tmp_path)
    assert [(r.id, r.key) for r in db.leases()] == [("old", None)]
    db.put_lease(replace(lease_row("new", "m"), key="fingerprint-1"))
    db.close()
    reopened = StateDB.open(tmp_path)
    assert [(r.id, r.key) for r in reopened.leases()] == [("old", None), ("new", "fingerprint-1")]
    reopened.close()


def test_a_batch_commits_once_and_a_failed_write_in_it_is_undone_alone(tmp_path: Path) -> None:
    db = StateDB.open(tmp_path)
    outside = sqlite3.connect(tmp_path / FILENAME)
    with db.batch():
        db.put_model(model_row("a"))
        db.put_lease(lease_row("l1", "a"))
        with pytest.raises(sqlite3.OperationalError):  # a write that fails midway
            db._write(
                ("DELETE FROM leases WHERE id = ?", ("l1",)), ("INSERT INTO nowhere VALUES (1)", ())
            )
        db.set_model_state("a", "ready")
        # Another connection sees nothing before the commit.
        assert outside.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 0
    assert outside.execute("SELECT id, state FROM models").fetchall() == [("a", "ready")]
    assert [r.id for r in db.leases()] == ["l1"]
    outside.close()


def test_a_batch_frozen_midway_keeps_what_it_wrote_before(tmp_path: Path) -> None:
    db = StateDB.open(tmp_path)
    with db.batch():
        db.put_model(model_row("before"))
        db.freeze()
        db.put_model(model_row("after"))
    db.close()
    assert [r.id for r in StateDB.open(tmp_path).models()] == ["before"]
