"""One process per load: a load that can start at once prices itself at submit and then
loads (`prepare`, `go`); one that must wait its turn is priced by a helper and started
when its turn comes; a priced load that ended while it waited is started again; a queued
one that is cancelled is ended."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from service.common.load.spec import LoadRequest
from tests.conftest import until
from tests.serving.registry.conftest import Registries
from tests.serving.registry.fake_backend import FakeLoad, Gate, MiB, Pause, Ready, Setup, cpu


def _request(name: str) -> LoadRequest:
    return LoadRequest.model_validate({"source": f"acme/{name}", "name": name})


def test_the_process_that_priced_a_load_loads_it(registries: Registries) -> None:
    setup = registries(max_concurrent_loads=1)
    setup.backend.prices["acme/m"] = cpu(MiB)
    setup.registry.submit(_request("m"), None)
    until(lambda: setup.state("m") == "ready", "the load never became ready", 10)
    (load,) = setup.backend.started("m")
    assert setup.backend.prepared == [load] and load.went


def test_a_load_that_must_wait_is_priced_by_a_helper_and_started_in_turn(
    registries: Registries,
) -> None:
    setup = registries(max_concurrent_loads=1)
    backend = setup.backend
    gate = backend.gate()
    backend.prices.update({"acme/first": cpu(MiB), "acme/second": cpu(MiB)})
    backend.scripts["first"] = [Pause(gate), Ready()]
    setup.registry.submit(_request("first"), None)
    assert gate.reached.wait(10)
    setup.registry.submit(_request("second"), None)  # the only load slot is taken
    assert setup.state("second") == "queued" and backend.started("second") == []
    gate.open()
    until(lambda: setup.state("second") == "ready", "the second load never ran", 10)
    (second,) = backend.started("second")
    assert second not in backend.prepared and second.admitted  # priced at submit


@contextmanager
def queued_behind_a_load(registries: Registries) -> Iterator[tuple[Setup, FakeLoad, Gate]]:
    """`m` priced by its own load while the only slot was free, then queued behind
    `blocker`, submitted meanwhile and paused at the gate yielded (opened on exit)."""
    setup = registries(max_concurrent_loads=1)
    backend = setup.backend
    backend.prices.update({"acme/m": cpu(MiB), "acme/blocker": cpu(MiB)})
    pricing, blocking = backend.gate(), backend.gate()
    backend.pricing["m"] = pricing
    backend.scripts["blocker"] = [Pause(blocking), Ready()]
    submitted = threading.Thread(target=setup.registry.submit, args=(_request("m"), None))
    submitted.start()
    assert pricing.reached.wait(10)
    setup.registry.submit(_request("blocker"), None)
    assert blocking.reached.wait(10)
    (priced,) = backend.started("m")
    try:
        yield setup, priced, pricing
    finally:
        pricing.open()
        submitted.join(10)
        blocking.open()


def test_a_priced_load_that_ended_before_its_turn_is_started_again(
    registries: Registries,
) -> None:
    with queued_behind_a_load(registries) as (setup, priced, pricing):
        priced.exit(0)  # it waited for `go` too long and gave up
        pricing.open()
        until(lambda: setup.state("m") == "queued", "m was not queued", 10)
    until(lambda: setup.state("m") == "ready", "m never became ready", 10)
    first, again = setup.backend.started("m")
    assert first is priced and first.went is False and first.closed
    assert again.admitted and again.went is None


def test_cancelling_a_queued_priced_load_ends_its_process(registries: Registries) -> None:
    with queued_behind_a_load(registries) as (setup, priced, pricing):
        pricing.open()
        until(lambda: setup.state("m") == "queued", "m was not queued", 10)
        assert setup.registry.unload("m") is None  # never ran: gone at once
        assert priced.killed and priced.closed and priced.went is None
    until(lambda: setup.state("blocker") == "ready", "the blocker never became ready", 10)
    assert setup.backend.started("m") == [priced]
