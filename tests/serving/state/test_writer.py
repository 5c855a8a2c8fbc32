"""State database writes run after the deciding lock is let go, in decision order; a thread
that wrote nothing never waits for another thread's writes when it lets go."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from service.serving.state.writer import OrderedWriter, WriterLock

WAIT = 10.0  # generous: these are bounds for a loaded machine, not expected durations


class Blocked:
    """A write that runs until the test lets it go (a slow disk, a locked database)."""

    def __init__(self, written: list[str], name: str) -> None:
        self.written = written
        self.name = name
        self.running = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.running.set()
        assert self.release.wait(WAIT * 3), "the test never let the write go"
        self.written.append(self.name)


def _thread(target: Callable[[], None]) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        target()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


@contextmanager
def slow_write_in_another_thread(
    lock: WriterLock, written: list[str]
) -> Iterator[tuple[Blocked, threading.Event]]:
    """Another thread queued a write under `lock` and is running it (until released)."""
    slow = Blocked(written, "slow")

    def decide() -> None:
        with lock:
            lock.writer.submit(slow)

    thread, done = _thread(decide)
    try:
        assert slow.running.wait(WAIT), "the slow write never started"
        yield slow, done
    finally:
        slow.release.set()
        thread.join(WAIT)


def test_a_read_only_exit_never_waits_for_another_threads_write() -> None:
    """A read-only section (the attach path reads the leases) let go of the lock while
    another thread's write ran: it waited the whole write (0.9 s behind a 1 s write)."""
    writer, written = OrderedWriter(), list[str]()
    lock = WriterLock(writer)
    with slow_write_in_another_thread(lock, written) as (slow, _):

        def read_only() -> None:
            with lock:
                pass

        _, left = _thread(read_only)
        assert left.wait(WAIT), "a read-only exit waited for another thread's write"
        assert not slow.release.is_set() and written == []


def test_a_threads_own_writes_are_in_when_it_lets_go_in_decision_order() -> None:
    writer, written = OrderedWriter(), list[str]()
    lock = WriterLock(writer)
    with slow_write_in_another_thread(lock, written) as (slow, first_done):

        def decide_and_write() -> None:
            with lock:
                writer.submit(lambda: written.append("mine"))
            # Back from the exit: what this thread decided is written, after what was
            # decided before it.
            assert written == ["slow", "mine"]

        second, second_done = _thread(decide_and_write)
        slow.release.set()
        assert second_done.wait(WAIT) and first_done.wait(WAIT)
        second.join(WAIT)
    assert written == ["slow", "mine"]


def test_nested_sections_write_once_the_outermost_lets_go() -> None:
    writer, written = OrderedWriter(), []
    outer, inner = WriterLock(writer), WriterLock(writer)
    with outer:
        with inner:
            writer.submit(lambda: written.append("a"))
        assert written == [], "written under the outer lock"
    assert written == ["a"]


def test_flush_writes_everything_queued_by_any_thread() -> None:
    """The explicit flush (shutdown, the node features file) writes what every thread
    queued, including what was queued on an event loop (which never writes itself)."""
    writer, written = OrderedWriter(), list[str]()
    lock = WriterLock(writer)

    async def on_the_loop() -> None:
        with lock:
            writer.submit(lambda: written.append("loop"))

    asyncio.run(on_the_loop())
    assert written == [], "a write ran on the event loop"
    writer.flush()
    assert written == ["loop"]


def test_deferred_writes_run_at_the_end_of_the_block_in_one_batch() -> None:
    writer, written = OrderedWriter(), list[str]()
    batches: list[str] = []

    @contextmanager
    def batch() -> Iterator[None]:
        batches.append("begin")
        yield
        batches.append("commit")

    writer.batch = batch
    lock = WriterLock(writer)
    with writer.deferred():
        for name in ("a", "b", "c"):
            with lock:
                writer.submit(functools.partial(written.append, name))
        assert written == [], "written inside the deferred block"
    assert written == ["a", "b", "c"] and batches == ["begin", "commit"]
