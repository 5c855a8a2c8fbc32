"""tests/shared_memory.py: a service's shared memory counts, nobody else's does."""

from __future__ import annotations

import os

import psutil
import pytest

from tests.shared_memory import (
    MiB,
    held_shared_memory,
    holders,
    holding,
    service_processes,
    serving,
    shared_objects,
    tree,
)


def shm_file(name: str) -> str:
    return f"/dev/shm/basehold-test-{os.getpid()}-{name}"


def test_shared_memory_held_by_another_process_does_not_count() -> None:
    """256 MiB of memfd and /dev/shm taken by an unrelated process while the service is
    measured: the machine's Shmem grows by that much, the service's measure by nothing."""
    with holding(f"fd:memfd:{4 * MiB}") as service:
        before = held_shared_memory(service.pid)
        outsider = (f"fd:memfd:{128 * MiB}", f"fd:{shm_file('outsider')}:{128 * MiB}")
        with holding(*outsider) as other:
            assert held_shared_memory(service.pid) == before
            # ...and yet the outsider's memory is there, counted where it is held.
            held = shared_objects(tree(other.pid)).values()
            assert sorted(found.size for found in held) == [128 * MiB, 128 * MiB]
        assert held_shared_memory(service.pid) == before


@pytest.mark.parametrize("how", ["fd", "mapped", "twice", "child"])
@pytest.mark.parametrize("where", ["memfd", "dev-shm"])
def test_what_the_service_holds_counts_once_at_its_size(how: str, where: str) -> None:
    """An object kept by an fd, by a mapping alone, by two fds and a mapping, or by a child
    (a loader) counts once, at the bytes allocated."""
    target = "memfd" if where == "memfd" else shm_file(how)
    with holding() as idle:
        baseline = held_shared_memory(idle.pid)  # the loader template's (none, idle)
    with holding(f"{how}:{target}:{32 * MiB}") as service:
        [found] = shared_objects(tree(service.pid)).values()
        assert found.size == 32 * MiB
        assert found.name.startswith("/memfd:holder" if where == "memfd" else target)
        assert held_shared_memory(service.pid) - baseline == 32 * MiB


def test_a_leak_on_the_service_side_shows() -> None:
    """One more memfd kept by the service's side (here by a child, as a loader would keep
    it) grows the measure by its size."""
    with holding(f"fd:memfd:{8 * MiB}") as without:
        before = held_shared_memory(without.pid)
    with holding(f"fd:memfd:{8 * MiB}", f"child:memfd:{24 * MiB}") as leaky:
        assert held_shared_memory(leaky.pid) - before == 24 * MiB


def test_the_loader_template_and_its_loaders_are_the_services() -> None:
    """The tests' services fork loaders from the session's shared template: it (with its
    children, the loaders, as `tree` finds them) counts with the serving process; this
    test process, the parent of both, does not."""
    address = os.environ["BASEHOLD_LOADER_TEMPLATE"]
    [template] = [pid for pid in serving(address) if psutil.Process(pid).ppid() == os.getpid()]
    with holding() as service:
        processes = service_processes(service.pid)
        assert service.pid in processes and template in processes
        assert os.getpid() not in processes


def test_holders_are_every_process_that_keeps_the_object() -> None:
    with holding(f"child:memfd:{MiB}") as process:
        [key] = shared_objects(tree(process.pid))
        assert holders(key) == tree(process.pid)[1:]  # the child: the parent closed its fd
    assert holders(key) == []
