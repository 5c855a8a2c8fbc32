"""An in-process `LoaderBackend` for registry tests: each load follows a script of steps
the test writes (progress, a pause until the test lets it go, a late admission, a failure
with a given code, a crash, the manifest), so tests drive every state transition, race
and failure of the registry deterministically, without forking a loader. The registry,
its memory gate, its lease table and its states are the real ones."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from service.common.errors import LoaderCrashed, relayed
from service.common.estimates import Estimate
from service.common.load.pin import HubPin
from service.common.load.progress import Progress
from service.common.load.spec import LoadRequest, Task
from service.common.protocol.held import Held, Manifest, Placed
from service.common.protocol.wire import close_fds
from service.serving.leases.leases import LeaseTable
from service.serving.memory.admission import Budget
from service.serving.memory.nvml import GpuMemory
from service.serving.registry.backend import SnapshotSource
from service.serving.registry.gate import MemoryGate, MemoryPolicy
from service.serving.registry.record import ModelRecord
from service.serving.registry.registry import Registry
from service.serving.registry.states import State
from tests.serving.api.test_memory import FakeCuda

MiB = 1 << 20
PATIENCE = 60.0  # no gate is held this long unless a test forgot to open it


class Gate:
    """A point a load (or a probe) stops at until the test opens it; `reached` is set when
    something gets there. Made by `FakeBackend.gate()`."""

    def __init__(self, changed: threading.Condition) -> None:
        self._changed = changed
        self.reached = threading.Event()
        self.opened = False

    def open(self) -> None:
        with self._changed:
            self.opened = True
            self._changed.notify_all()

    def wait(self, ended: Callable[[], bool] = lambda: False) -> None:
        """Stop here until opened, or until `ended()` (the load was killed)."""
        with self._changed:
            self.reached.set()
            if not self._changed.wait_for(lambda: self.opened or ended(), PATIENCE):
                raise AssertionError("the test never opened a gate")


# -- the steps of a load ---------------------------------------------------------------
@dataclass(frozen=True)
class Report:
    """The loader reports progress."""

    phase: str
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class Pause:
    """The loader stops until the test opens `gate`; killed meanwhile, it sends nothing
    more."""

    gate: Gate


@dataclass(frozen=True)
class AskAdmission:
    """A load not priced at submit asks admission before it reads any weight."""

    estimate: Estimate


@dataclass(frozen=True)
class Fail:
    """The loader reports its load failed with `code`."""

    code: str
    message: str = "the fake load failed"
    status: int = 500


@dataclass(frozen=True)
class Crash:
    """The loader dies (`exitcode`: negative for a signal)."""

    exitcode: int = -signal.SIGSEGV


@dataclass(frozen=True)
class Ready:
    """The manifest: the model is held. `runner`: not shareable, the loader stays alive
    holding it (a runner) until the model is discarded."""

    by_device: dict[str, int] = field(default_factory=lambda: {"cpu": MiB})
    runner: bool = False


Step = Report | Pause | AskAdmission | Fail | Crash | Ready


def cpu(nbytes: int) -> Estimate:
    return Estimate(total_bytes=nbytes, by_device={"cpu": nbytes}, largest_layer_bytes=nbytes)


def _describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


class FakeLoad:
    """A `RunningLoad`: the loader (then the runner) of one load, in-process."""

    pid: int | None = None

    def __init__(
        self,
        changed: threading.Condition,
        model_id: str,
        load_id: str,
        spec: LoadRequest,
        admitted: bool,
        steps: Sequence[Step],
    ) -> None:
        self._changed = changed
        self.model_id = model_id
        self.load_id = load_id
        self.spec = spec
        self.admitted = admitted
        self.steps = list(steps)
        self.exitcode: int | None = None
        self.killed = False
        self.stopped = False  # told to stop (its late admission was refused)
        self.closed = False
        self.went: bool | None = None  # a prepared load: whether `go` reached it

    def exit(self, exitcode: int) -> None:
        """It ends by itself (a handed-over loader exits 0; a dying runner)."""
        with self._changed:
            if self.exitcode is None:
                self.exitcode = exitcode
            self._changed.notify_all()

    def kill(self) -> None:
        with self._changed:
            self.killed = True
        self.exit(-signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: self.exitcode is not None, timeout)
            return self.exitcode

    def ended(self, timeout: float = 5.0) -> str:
        return _describe(self.wait(timeout))

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    """`LoaderBackend` whose loads follow `scripts[model_id]` (default: ready at once,
    1 MiB on the host). `prices[source]`: what an estimate of that source answers (a
    source without one cannot be priced at submit: its load is admitted when it asks)."""

    def __init__(self, roots: Sequence[Path] = ()) -> None:
        self._roots = list(roots)
        self._changed = threading.Condition()
        self.scripts: dict[str, list[Step]] = {}
        self.prices: dict[str, Estimate] = {}
        self.loads: list[FakeLoad] = []
        self.prepared: list[FakeLoad] = []  # loads that priced themselves at submit
        self.pricing: dict[str, Gate] = {}
        self.priced: list[str] = []  # the source of each estimate asked for, in order
        self.held: dict[str, FakeLoad] = {}  # load id -> its loader, while its model is held
        self.discarded: list[str] = []
        self.closed = False
        self.gates: list[Gate] = []

    def gate(self) -> Gate:
        self.gates.append(Gate(self._changed))
        return self.gates[-1]

    def started(self, model_id: str) -> list[FakeLoad]:
        return [load for load in self.loads if load.model_id == model_id]

    # -- LoaderBackend -----------------------------------------------------------------
    @property
    def roots(self) -> list[Path]:
        return self._roots

    def estimate(
        self, spec: LoadRequest, token: str | None, *, full: bool, server_token: bool = True
    ) -> Estimate:
        self.priced.append(spec.source)
        price = self.prices.get(spec.source)
        if price is None:
            raise LoaderCrashed(f"{spec.source} cannot be priced before its load")
        return price

    def prepare(
        self, model_id: str, load_id: str, spec: LoadRequest, token: str | None
    ) -> tuple[FakeLoad, Estimate]:
        """As the loader does: priced as `estimate` is, then waiting for `go`; stops at
        `pricing[model_id]` (a gate) before it answers, where a test set one."""
        price = self.estimate(spec, token, full=True)
        load = self.start(model_id, load_id, spec, token, admitted=False)
        self.prepared.append(load)
        if (gate := self.pricing.get(model_id)) is not None:
            gate.wait()
        return load, price

    def go(self, loader: FakeLoad) -> bool:
        with self._changed:
            loader.went = loader.exitcode is None
            return loader.went

    def start(
        self,
        model_id: str,
        load_id: str,
        spec: LoadRequest,
        token: str | None,
        admitted: bool,
        pin: HubPin | None = None,
    ) -> FakeLoad:
        steps = self.scripts.get(model_id, [Ready()])
        load = FakeLoad(self._changed, model_id, load_id, spec, admitted, steps)
        self.loads.append(load)
        return load

    def drive(
        self, loader: FakeLoad, progress: Progress, admit: Callable[[Estimate], None]
    ) -> Held:
        for step in loader.steps:
            if isinstance(step, Pause):
                step.gate.wait(lambda: loader.killed)
            elif isinstance(step, Crash):
                loader.exit(step.exitcode)
            if loader.exitcode is not None:  # it died: nothing more comes from it
                progress.check_cancelled()
                raise LoaderCrashed(f"The fake loader {loader.ended()}.")
            if isinstance(step, Report):
                progress.mirror(step.phase, step.bytes_done, step.bytes_total)
            elif isinstance(step, AskAdmission):
                try:
                    admit(step.estimate)
                except BaseException:
                    loader.stopped = True
                    raise
            elif isinstance(step, Fail):
                raise relayed(step.code, step.message, step.status)
            elif isinstance(step, Ready):
                held = held_of(step)
                self.held[loader.load_id] = loader
                if not step.runner:
                    loader.exit(0)  # it handed its fds over
                return held
        raise AssertionError(f"the script of {loader.model_id} ends without Ready")

    def adopt(
        self,
        model_id: str,
        load_id: str,
        spec: LoadRequest,
        facts: Manifest,
        fds: list[int],
        runner: int | None = None,
    ) -> tuple[Held, FakeLoad | None]:
        """As `Loaders.adopt` keeps what a predecessor handed over: held from now on."""
        held = Held.from_manifest(facts)
        load = FakeLoad(self._changed, model_id, load_id, spec, True, [])
        self.held[load_id] = load
        close_fds(fds)  # nothing in this fake reads them
        return held, load if runner is not None else None

    def discard(self, load_id: str, keep_until: datetime | None = None) -> None:
        self.discarded.append(load_id)
        loader = self.held.pop(load_id, None)
        if loader is not None:
            loader.kill()  # a runner ends with its model

    def close(self) -> None:
        self.closed = True
        for load in self.loads:
            load.kill()


def held_of(step: Ready) -> Held:
    placed = Placed(shareable=False, reason="a fake runner holds it") if step.runner else None
    return Held(
        task=Task.CAUSAL_LM,
        architecture="FakeForCausalLM",
        dtype="float32",
        parameters=sum(step.by_device.values()) // 4,
        resolved_revision=None,
        by_device=dict(step.by_device),
        device_map={"": "cpu"},
        placed=placed or Placed(shareable=True),
        checkpoint=Path("/nonexistent/fake"),
        allowed=(),
    )


class FakeGpus:
    """No GPU (absent hardware). `pause`: the next listing stops at that gate (a probe
    stuck in the driver), then it is cleared."""

    def __init__(self) -> None:
        self.pause: Gate | None = None

    def gpus(self) -> list[GpuMemory]:
        pause, self.pause = self.pause, None
        if pause is not None:
            pause.wait()
        return []


@dataclass
class Setup:
    registry: Registry
    backend: FakeBackend
    gpus: FakeGpus
    leases: LeaseTable
    history: list[tuple[str, str, str]]  # (model id, from, to) for every state change

    def state(self, model_id: str) -> str:
        """The model's state, or "gone"."""
        found = [r for r in self.registry.records() if r.id == model_id]
        return found[0].state.value if found else "gone"


def make_registry(
    budget: int = 64 * MiB,
    eviction: str = "none",
    max_concurrent_loads: int = 2,
    roots: Sequence[Path] = (),
    gpus_seen: int = 0,
    snapshots: SnapshotSource | None = None,
) -> Setup:
    """A registry over a `FakeBackend`, with a host memory budget of `budget` bytes and no
    GPU memory (`gpus_seen`: how many GPUs the CUDA seam says there are; `roots`: where
    local sources may be). Call `registry.shutdown()` at the end."""
    backend, gpus, cuda = FakeBackend(roots), FakeGpus(), FakeCuda(gpus_seen)
    gate = MemoryGate(MemoryPolicy(Budget(0, budget), eviction), cuda, gpus)
    leases = LeaseTable()
    registry = Registry(
        backend,
        cuda,
        gate,
        leases,
        max_concurrent_loads=max_concurrent_loads,
        allow_remote_code=False,
        snapshots=snapshots,
    )
    history: list[tuple[str, str, str]] = []

    def note(record: ModelRecord, previous: State, target: State) -> None:
        if previous != target:
            history.append((record.id, previous.value, target.value))

    registry.subscribe(note)
    return Setup(registry, backend, gpus, leases, history)
