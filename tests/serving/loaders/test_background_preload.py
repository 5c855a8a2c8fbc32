"""The loader template says ready once it imported what every load needs, and imports the
rest of its preload while idle (issue 30): /readyz answers seconds sooner, a loader forked
before the rest is there works (it imports what its load needs itself), and the rest is
imported all the same. `basehold serve` starts the template before it imports the app; the
service adopts it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.serving.loaders import keeper
from tests.conftest import ClientFactory, load, until

PRELOAD = "tests.serving.loaders.preload_gate,tests.serving.loaders.preload_mark"


def test_the_template_serves_before_its_background_preload_ends_and_a_loader_forked_then_works(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    make_client: ClientFactory,
    models_root: Path,
) -> None:
    # The gate, imported in the background, returns only once a request waits on the
    # template's socket; the mark after it is imported once no request is being read. Both
    # write to `said`.
    said = tmp_path / "preload.log"
    monkeypatch.setenv("BH_TEST_PRELOAD_LOG", str(said))
    monkeypatch.setenv("BASEHOLD_LOADER_PRELOAD", PRELOAD)
    client = make_client(loader_template="")  # its own template, with this environment

    def lines() -> list[str]:
        return said.read_text().splitlines() if said.exists() else []

    until(lambda: client.get("/readyz").status_code == 200, "/readyz never said ready", 300)
    # Serving, it imports its own background list, then waits at the gate: its background
    # preload cannot end until a loader is asked for.
    until(lambda: lines() == ["gate waiting"], "the template never reached the gate", 120)
    # The load's first request (its estimate, at POST) opens the gate: that loader is forked
    # before the background preload ends, and the load works.
    body = load(client, source=str(models_root / "llama"), device_map="cpu")
    assert body["state"] == "ready", body
    until(lambda: len(lines()) == 3, "the background preload never ended", 120)
    _, opened, last = lines()
    assert opened == "gate opened by a request", opened
    assert last.startswith("imported last in "), last
    # The template still forks once it is done.
    again = load(client, source=str(models_root / "llama-tied"), device_map="cpu")
    assert again["state"] == "ready", again


def test_a_template_started_early_is_adopted_by_the_service() -> None:
    """`basehold serve` starts it before it imports the app: the first Template without an
    address waits for that one rather than starting another, and ends it on close."""
    early = keeper.start_early()
    template = keeper.Template()
    try:
        assert template.wait_up(300), template.liveness()
        assert template._address == str(Path(early.folder) / keeper.SOCKET)
        assert early.process.poll() is None
        assert keeper.Template()._early is None  # adopted once
    finally:
        template.close()
    assert early.process.poll() is not None
    assert not os.path.exists(early.folder)


def test_an_early_template_the_service_does_not_use_is_ended() -> None:
    """A start refused after it (a port in use, a bad setting) ends it, folder and all."""
    early = keeper.start_early()
    early.abandon()
    assert early.process.poll() is not None
    assert not os.path.exists(early.folder)
    assert keeper.Template()._early is None
