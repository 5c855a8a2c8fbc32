from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.serving.registry.fake_backend import Setup, make_registry

Registries = Callable[..., Setup]


@pytest.fixture
def registries() -> Iterator[Registries]:
    """Registries over fake backends (`make_registry`'s arguments), shut down after the
    test."""
    made: list[Setup] = []

    def make(**options: Any) -> Setup:
        made.append(make_registry(**options))
        return made[-1]

    yield make
    for setup in made:
        for gate in setup.backend.gates:  # a failed test may have left loads waiting
            gate.open()
        setup.registry.shutdown()
