"""The registry's side of a restore from a snapshot: a model let go of while its snapshot
is copied ends gone, never loaded and never held."""

from __future__ import annotations

import threading
from collections.abc import Callable

from service.common.load.spec import LoadRequest
from service.serving.registry.record import Adopted, utcnow
from service.serving.state.database import ModelRow
from tests.conftest import until
from tests.serving.registry.conftest import Registries
from tests.serving.registry.fake_backend import Ready, held_of


class SlowSnapshots:
    """Snapshots of every model, whose copy waits for `release` (a large arena)."""

    def __init__(self) -> None:
        self.taking = threading.Event()
        self.release = threading.Event()

    def has(self, model_id: str) -> bool:
        return True

    def take(self, model_id: str, spec_key: str, cancelled: Callable[[], bool]) -> Adopted:
        self.taking.set()
        assert self.release.wait(10)
        facts = held_of(Ready(runner=True)).manifest()
        return Adopted(f"{model_id}.snapshot", facts, [], None, None, runner=4242)


def test_an_unload_while_a_snapshot_is_copied_ends_the_model_gone(
    registries: Registries,
) -> None:
    snapshots = SlowSnapshots()
    setup = registries(snapshots=snapshots)
    spec = LoadRequest.model_validate({"source": "acme/m", "name": "m"})
    now = utcnow()
    row = ModelRow("m", "m", spec.model_dump(mode="json"), "key", "ready", now, now)
    assert [r.id for r in setup.registry.restore([row])] == ["m"]
    assert snapshots.taking.wait(10)
    setup.registry.unload("m")
    assert setup.state("m") == "cancelled"
    snapshots.release.set()
    until(lambda: setup.state("m") == "gone", "the cancelled restore never ended", 10)
    assert "m.snapshot" in setup.backend.discarded  # what the copy made is let go of
    assert setup.backend.started("m") == []  # and nothing was loaded instead
    assert ("m", "cancelled", "gone") in setup.history
