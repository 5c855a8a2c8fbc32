"""The registry's side of a restore from a snapshot: a model let go of while its snapshot
is copied ends gone, never loaded and never held; a snapshot is admitted as a load is (one
that does not fit now is loaded instead, and priced as a load)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from service.common.load.spec import LoadRequest
from service.serving.registry.record import Adopted, utcnow
from service.serving.state.database import ModelRow
from tests.conftest import until
from tests.serving.registry.conftest import Registries
from tests.serving.registry.fake_backend import MiB, Ready, Setup, held_of


class FakeSnapshots:
    """A snapshot of `size` bytes of every model; once admitted, its copy waits for
    `release` (set at first: a small arena). `copied`: the models taken."""

    def __init__(self, size: int = MiB) -> None:
        self.size = size
        self.taking = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.copied: list[str] = []

    def has(self, model_id: str) -> bool:
        return True

    def take(
        self,
        model_id: str,
        spec_key: str,
        cancelled: Callable[[], bool],
        admit: Callable[[int], bool],
    ) -> Adopted | None:
        if not admit(self.size):
            return None
        self.taking.set()
        assert self.release.wait(10)
        self.copied.append(model_id)
        facts = held_of(Ready(runner=True)).manifest()
        return Adopted(f"{model_id}.snapshot", facts, [], None, None, runner=4242)

    def let_go(self, load_id: str) -> None:
        pass


def _restore_one(setup: Setup) -> None:
    spec = LoadRequest.model_validate({"source": "acme/m", "name": "m"})
    now = utcnow()
    row = ModelRow("m", "m", spec.model_dump(mode="json"), "key", "ready", now, now)
    assert [r.id for r in setup.registry.restore([row])] == ["m"]


def test_an_unload_while_a_snapshot_is_copied_ends_the_model_gone(
    registries: Registries,
) -> None:
    snapshots = FakeSnapshots()
    snapshots.release.clear()  # a large arena
    setup = registries(snapshots=snapshots)
    _restore_one(setup)
    assert snapshots.taking.wait(10)
    setup.registry.unload("m")
    assert setup.state("m") == "cancelled"
    snapshots.release.set()
    until(lambda: setup.state("m") == "gone", "the cancelled restore never ended", 10)
    assert "m.snapshot" in setup.backend.discarded  # what the copy made is let go of
    assert setup.backend.started("m") == []  # and nothing was loaded instead
    assert ("m", "cancelled", "gone") in setup.history


def test_a_snapshot_that_fits_is_admitted_and_held_without_a_load(
    registries: Registries,
) -> None:
    snapshots = FakeSnapshots(16 * MiB)  # the budget: 64 MiB
    setup = registries(snapshots=snapshots)
    _restore_one(setup)
    until(lambda: setup.state("m") == "ready", "the snapshot was not held", 10)
    assert snapshots.copied == ["m"]
    assert setup.backend.started("m") == []


def test_a_snapshot_larger_than_the_memory_left_is_loaded_instead(
    registries: Registries,
) -> None:
    """Never copied (no memory taken that admission would refuse); the model is loaded
    instead, which prices itself (here: a small model, held)."""
    snapshots = FakeSnapshots(128 * MiB)
    setup = registries(snapshots=snapshots)
    _restore_one(setup)
    until(lambda: setup.state("m") == "ready", "the model was not loaded instead", 10)
    assert snapshots.copied == []
    assert setup.backend.started("m") != []
