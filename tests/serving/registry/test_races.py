"""Races between requests, loads and restore, driven deterministically by a fake backend
(scripted in-process loads) and a GPU probe the test can hold."""

from __future__ import annotations

from service.common.load.spec import LoadRequest
from service.serving.state.database import ModelRow
from tests.conftest import until
from tests.serving.registry.conftest import Registries
from tests.serving.registry.fake_backend import AskAdmission, MiB, Pause, Ready, cpu


def _request(name: str) -> LoadRequest:
    return LoadRequest.model_validate({"source": f"acme/{name}", "name": name})


def test_a_load_cancelled_while_asking_admission_evicts_nothing(registries: Registries) -> None:
    """The loader asked admission; the load was cancelled while admission probed memory
    (before the registry's lock): it went on to evict a ready model for a load that was
    gone."""
    setup = registries(budget=10 * MiB, eviction="lru-idle")
    registry, backend = setup.registry, setup.backend
    backend.scripts["old"] = [Ready({"cpu": 6 * MiB})]
    backend.prices["acme/old"] = cpu(6 * MiB)
    old, _ = registry.submit(_request("old"), None)
    until(lambda: setup.state("old") == "ready", "the old model never became ready", 10)

    probing = setup.gpus.pause = backend.gate()  # admission's memory probe stops here
    backend.scripts["new"] = [AskAdmission(cpu(6 * MiB)), Ready({"cpu": 6 * MiB})]
    registry.submit(_request("new"), None)  # not priced at submit: admitted when it asks
    assert probing.reached.wait(10), "the load never asked admission"
    assert registry.unload("new") is not None  # cancelled while admission probes
    probing.open()
    until(lambda: setup.state("new") == "gone", "the cancelled load never ended", 10)

    assert setup.state("old") == "ready", "a cancelled load evicted a ready model"
    assert not old.evicted and old.load_id not in backend.discarded
    assert ("old", "ready", "unloading") not in setup.history


def test_restore_never_replaces_an_active_load_of_the_same_id(registries: Registries) -> None:
    """A restored row whose id is loading already (a preload that ran first) overwrote
    the active record: two loads of one id, one of them orphaned."""
    setup = registries()
    registry, backend = setup.registry, setup.backend
    gate = backend.gate()
    backend.scripts["m"] = [Pause(gate), Ready()]
    active, _ = registry.submit(_request("m"), None)
    assert gate.reached.wait(10)
    row = ModelRow(
        id="m",
        name="m",
        spec=active.spec.model_dump(mode="json"),
        spec_key=active.key,
        state="ready",
        queued_at=active.queued_at,
        last_used_at=active.last_used_at,
    )
    assert registry.restore([row]) == []
    assert registry.get("m") is active
    gate.open()
    until(lambda: setup.state("m") == "ready", "the load never became ready", 10)
    assert len(backend.started("m")) == 1, "a second load of the same id started"
    assert registry.get("m") is active


def test_a_successor_starts_new_loads_once_it_holds_the_state_lock(
    registries: Registries,
) -> None:
    """A successor serves before it holds the state lock, while its predecessor still ends
    its own loads and runners: a load asked for meanwhile is queued and starts with the
    restored ones (`start_deferred`), never beside the predecessor's; one unloaded before
    then is gone at once, without a load."""
    setup = registries()
    registry, backend = setup.registry, setup.backend
    assert registry.restore([], start=False) == []
    backend.scripts["early"] = [Ready()]
    backend.scripts["dropped"] = [Ready()]
    early, queued = registry.submit(_request("early"), None)
    dropped, _ = registry.submit(_request("dropped"), None)
    assert queued and early.future is None and setup.state("early") == "queued"
    assert registry.unload("dropped") is None and setup.state("dropped") == "gone"
    assert dropped.future is None

    registry.start_deferred()
    until(lambda: setup.state("early") == "ready", "the deferred load never ran", 10)
    backend.scripts["later"] = [Ready()]
    later, _ = registry.submit(_request("later"), None)
    assert later.future is not None, "a load after start_deferred waited"
