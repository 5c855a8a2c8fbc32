"""Every state a load goes through, and how each failure ends, driven by a fake backend
(in-process scripted loads: no loader is forked, nothing waits on a clock)."""

from __future__ import annotations

import pytest

from service.common.errors import InsufficientMemory
from service.common.load.spec import LoadRequest
from tests.conftest import until
from tests.serving.registry.conftest import Registries
from tests.serving.registry.fake_backend import (
    AskAdmission,
    Crash,
    Fail,
    MiB,
    Pause,
    Ready,
    Report,
    cpu,
)


def _request(name: str, **extra: object) -> LoadRequest:
    return LoadRequest.model_validate({"source": f"acme/{name}", "name": name, **extra})


def test_a_load_goes_queued_loading_ready_and_unloads_to_gone(registries: Registries) -> None:
    setup = registries()
    registry, backend = setup.registry, setup.backend
    gate = backend.gate()
    backend.scripts["m"] = [Report("downloading", 5, 10), Pause(gate), Ready({"cpu": 3 * MiB})]
    record, queued = registry.submit(_request("m"), None)
    assert queued
    assert gate.reached.wait(10)
    assert record.state.value == "loading"
    assert (record.progress.phase.value, record.progress.bytes_done) == ("downloading", 5)
    gate.open()
    until(lambda: setup.state("m") == "ready", "the load never became ready", 10)
    assert record.footprint_bytes == 3 * MiB and record.progress.phase.value == "done"
    (load,) = backend.started("m")
    assert load.closed and load.exitcode == 0  # it handed over and exited
    assert registry.submit(_request("m"), None) == (record, False)  # held: found
    assert registry.unload("m") is None
    assert setup.state("m") == "gone" and backend.discarded == [record.load_id]
    assert setup.history == [
        ("m", "gone", "queued"),
        ("m", "queued", "loading"),
        ("m", "loading", "ready"),
        ("m", "ready", "unloading"),
        ("m", "unloading", "gone"),
    ]


def test_a_failed_load_keeps_its_code_and_message(registries: Registries) -> None:
    setup = registries()
    setup.backend.scripts["m"] = [
        Report("downloading", 1, 10),
        Fail("download_failed", "the hub hung up", 502),
    ]
    record, _ = setup.registry.submit(_request("m"), None)
    until(lambda: setup.state("m") == "failed", "the load never failed", 10)
    assert record.error is not None
    assert (record.error.code, record.error.message) == ("download_failed", "the hub hung up")
    (load,) = setup.backend.started("m")
    assert load.killed and load.closed
    assert setup.backend.discarded == [record.load_id]
    # A failed model is replaced by the next load of its id.
    setup.backend.scripts["m"] = [Ready()]
    again, queued = setup.registry.submit(_request("m"), None)
    assert queued and again is not record
    until(lambda: setup.state("m") == "ready", "the second load never became ready", 10)
    assert record.state.value == "gone"


def test_a_crashed_loader_fails_its_load_loader_crashed(registries: Registries) -> None:
    setup = registries()
    setup.backend.scripts["m"] = [Crash()]
    record, _ = setup.registry.submit(_request("m"), None)
    until(lambda: setup.state("m") == "failed", "the load never failed", 10)
    assert record.error is not None and record.error.code == "loader_crashed"
    assert "SIGSEGV" in record.error.message


def test_a_load_cancelled_while_loading_ends_gone(registries: Registries) -> None:
    setup = registries()
    gate = setup.backend.gate()
    setup.backend.scripts["m"] = [Pause(gate), Ready()]
    record, _ = setup.registry.submit(_request("m"), None)
    assert gate.reached.wait(10)
    assert setup.registry.unload("m") is record
    assert record.state.value == "cancelled"
    (load,) = setup.backend.started("m")
    assert load.killed, "a cancel kills the loader at once"
    until(lambda: setup.state("m") == "gone", "the cancelled load never ended", 10)
    assert record.state.value == "gone" and record.loaded is None
    assert setup.backend.discarded == [record.load_id]
    assert ("m", "loading", "ready") not in setup.history


def test_a_queued_load_cancelled_never_starts(registries: Registries) -> None:
    setup = registries(max_concurrent_loads=1)
    gate = setup.backend.gate()
    setup.backend.scripts["first"] = [Pause(gate), Ready()]
    setup.registry.submit(_request("first"), None)
    assert gate.reached.wait(10)
    setup.registry.submit(_request("second"), None)  # waits for the one load slot
    assert setup.registry.unload("second") is None
    assert setup.state("second") == "gone"
    gate.open()
    until(lambda: setup.state("first") == "ready", "the first load never became ready", 10)
    assert setup.backend.started("second") == []


def test_a_late_admission_that_does_not_fit_stops_the_load(registries: Registries) -> None:
    setup = registries(budget=4 * MiB)
    setup.backend.scripts["m"] = [AskAdmission(cpu(8 * MiB)), Ready({"cpu": 8 * MiB})]
    record, _ = setup.registry.submit(_request("m"), None)  # not priced at submit
    until(lambda: setup.state("m") == "failed", "the load was not refused", 10)
    assert record.error is not None and record.error.code == "insufficient_memory"
    (load,) = setup.backend.started("m")
    assert not load.admitted and load.stopped


def test_a_load_priced_at_submit_that_does_not_fit_is_refused_at_once(
    registries: Registries,
) -> None:
    setup = registries(budget=4 * MiB)
    setup.backend.prices["acme/m"] = cpu(8 * MiB)
    with pytest.raises(InsufficientMemory):
        setup.registry.submit(_request("m"), None)
    assert setup.state("m") == "gone"
    (load,) = setup.backend.started("m")  # it priced itself, and never read a weight
    assert load.killed and load.closed and load.went is None


def test_a_late_admission_evicts_an_idle_model_to_fit(registries: Registries) -> None:
    setup = registries(budget=10 * MiB, eviction="lru-idle")
    setup.backend.prices["acme/old"] = cpu(6 * MiB)
    setup.backend.scripts["old"] = [Ready({"cpu": 6 * MiB})]
    old, _ = setup.registry.submit(_request("old"), None)
    until(lambda: setup.state("old") == "ready", "the old model never became ready", 10)
    setup.backend.scripts["new"] = [AskAdmission(cpu(6 * MiB)), Ready({"cpu": 6 * MiB})]
    setup.registry.submit(_request("new"), None)
    until(lambda: setup.state("new") == "ready", "the new model never became ready", 10)
    assert setup.state("old") == "gone" and old.evicted
    assert old.load_id in setup.backend.discarded


def test_a_runner_that_dies_fails_its_ready_model(registries: Registries) -> None:
    setup = registries()
    setup.backend.scripts["m"] = [Ready(runner=True)]
    record, _ = setup.registry.submit(_request("m"), None)
    until(lambda: setup.state("m") == "ready", "the load never became ready", 10)
    (runner,) = setup.backend.started("m")
    assert runner.exitcode is None, "a runner stays alive holding its model"
    runner.exit(-9)
    until(lambda: setup.state("m") == "failed", "the model outlived its runner", 10)
    assert record.error is not None and record.error.code == "loader_crashed"
    assert "SIGKILL" in record.error.message


def test_unloading_a_runners_model_ends_its_runner(registries: Registries) -> None:
    setup = registries()
    setup.backend.scripts["m"] = [Ready(runner=True)]
    setup.registry.submit(_request("m"), None)
    until(lambda: setup.state("m") == "ready", "the load never became ready", 10)
    assert setup.registry.unload("m") is None
    (runner,) = setup.backend.started("m")
    assert runner.wait(10) is not None
    assert setup.state("m") == "gone"
    assert ("m", "ready", "failed") not in setup.history
