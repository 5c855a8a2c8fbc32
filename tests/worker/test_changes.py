"""service.worker.changes through Client.wait, against a live server: a waiter hears the
model's changes from the event stream instead of reading its status on a timer, and its
listening thread ends with the wait. Without a stream it polls:
test_client.py's restart test (its stand-in service answers JSON there)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from service.worker.changes import Changes
from service.worker.client import Client
from tests.conftest import until
from tests.serving.test_server_e2e import Server

pytestmark = pytest.mark.e2e

NEVER = 3600.0  # a poll interval no wait here could sit out: only a heard change ends it


def listeners() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "basehold-changes"]


def test_a_waiter_hears_its_model_ready_without_polling(
    live_server: Server, models_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="basehold.client")
    got: dict[str, Any] = {}
    client = Client(live_server.url)
    waiter = threading.Thread(
        target=lambda: got.update(client.wait("heard", timeout=120, poll=NEVER, absent_ok=True)),
        daemon=True,  # a failure here leaves it asleep: it must not hold pytest's exit
    )
    waiter.start()
    until(lambda: "does not exist yet" in caplog.text, "the waiter found no model yet")
    until(lambda: listeners(), "the waiter listens to the event stream")
    client.load(str(models_root / "llama"), name="heard", dtype="float32")
    waiter.join(timeout=90)  # polling every NEVER seconds it would still sleep
    assert got.get("state") == "ready"
    assert not listeners()  # the stream's thread ended with the wait
    assert client.wait("heard", poll=NEVER)["state"] == "ready"  # held: no stream at all
    assert not listeners()


def test_a_change_is_heard_by_the_id_an_alias_resolved_to(
    live_server: Server, models_root: Path
) -> None:
    """Events name a model by its id; a wait by an alias tracks the id its reads return."""
    client = Client(live_server.url)
    with Changes(client._http, "an-alias") as changes:
        assert changes.listening
        changes.track("tracked")
        changes.arm()
        client.load(str(models_root / "llama"), name="tracked", dtype="float32")
        assert changes.wait(NEVER, 60)  # heard: not the recheck's timeout
    with Changes(client._http, "an-alias") as changes:
        changes.arm()
        client.load(str(models_root / "llama"), name="untracked", dtype="bfloat16")
        client.wait("untracked")
        assert not changes.wait(NEVER, 0)  # nothing of its own was heard
