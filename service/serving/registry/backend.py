"""What the registry asks of loaders: one small interface (`LoaderBackend`), so the
registry never reaches into how a load runs. The service's backend is
`service.serving.loaders.loaders.Loaders` (loader processes forked from the template), which
satisfies it structurally; registry tests drive an in-process fake
(`tests/serving/registry/fake_backend.py`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from service.common.estimates import Estimate
from service.common.load.pin import HubPin
from service.common.load.progress import Progress
from service.common.load.spec import LoadRequest
from service.common.protocol.held import Held, Manifest

if TYPE_CHECKING:  # record.py imports this module
    from service.serving.registry.record import Adopted


class RunningLoad(Protocol):
    """A load under way (its loader), or the runner that holds a model that cannot be
    shared: the registry stops it, waits for it and says how it ended."""

    @property
    def pid(self) -> int | None: ...

    def kill(self) -> None:
        """End it at once (a cancel); what it held goes with it."""
        ...

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code once it ended (negative: the signal), None if still running."""
        ...

    def ended(self, timeout: float = 5.0) -> str:
        """How it ended, for an error message ("was killed by SIGKILL")."""
        ...

    def close(self) -> None:
        """Let go of the connection to it (it ended, or is about to)."""
        ...


L = TypeVar("L", bound=RunningLoad)


class LoaderBackend(Protocol[L]):
    """Runs loads for the registry. `L`: the backend's running load."""

    @property
    def roots(self) -> list[Path]:
        """The folders local sources must be under."""
        ...

    def estimate(
        self, spec: LoadRequest, token: str | None, *, full: bool, server_token: bool = True
    ) -> Estimate:
        """What `spec` would take. `full`: what admission at submit needs (a local
        checkpoint checked, a hub source's metadata; nothing downloaded); else the config
        alone. `server_token`: without `token`, the server's own hub token may be used.
        Raises the load's error when it cannot be priced."""
        ...

    def prepare(
        self, model_id: str, load_id: str, spec: LoadRequest, token: str | None
    ) -> tuple[L, Estimate]:
        """Start a load that prices itself first (as `estimate(full=True)` does) and then
        waits: once admitted, `go` lets the same process load, so the checkpoint is
        resolved and checked once. Raises as `estimate` does (the load is ended)."""
        ...

    def go(self, loader: L) -> bool:
        """Let a prepared load read its weights. False when it ended meanwhile (it waits
        for this only so long): the caller starts another."""
        ...

    def start(
        self,
        model_id: str,
        load_id: str,
        spec: LoadRequest,
        token: str | None,
        admitted: bool,
        pin: HubPin | None = None,
    ) -> L:
        """Start a load (`admitted`: admission is done; else it asks before it reads or
        downloads any weight). `pin`: the hub snapshot admission priced, which the load
        downloads without resolving the revision again."""
        ...

    def drive(self, loader: L, progress: Progress, admit: Callable[[Estimate], None]) -> Held:
        """Follow `loader` to its manifest, mirroring its progress. It calls `admit` when
        the load asks admission late (`admit` raises if it may not go on). Raises the
        load's own error, `LoadCancelled` once `progress.cancel` is set, or
        `LoaderCrashed` when the loader died."""
        ...

    def adopt(
        self,
        model_id: str,
        load_id: str,
        spec: LoadRequest,
        facts: Manifest,
        fds: list[int],
        runner: int | None = None,
    ) -> tuple[Held, L | None]:
        """Keep a model a predecessor handed over (its fds are now this process's): its
        memory, or (`runner`: its pid) the runner that holds it, returned. ValueError, its
        fds closed, when they do not match the manifest."""
        ...

    def discard(self, load_id: str, keep_until: datetime | None = None) -> None:
        """Free what a load holds or left (now, or at `keep_until` when revoked leases may
        still read its device memory)."""
        ...

    def close(self) -> None:
        """At shutdown, after every model was let go."""
        ...


class SnapshotSource(Protocol):
    """Where a restored model may be taken from instead of loaded
    (`service.serving.state.snapshots.Snapshots`)."""

    def has(self, model_id: str) -> bool:
        """Whether there is a snapshot of `model_id` to try (a cheap look, no check)."""
        ...

    def take(
        self,
        model_id: str,
        spec_key: str,
        cancelled: Callable[[], bool],
        admit: Callable[[int], bool],
    ) -> Adopted | None:
        """The model's memory from its snapshot, or None where none still agrees, `admit`
        (asked with its size in bytes, before any is copied) says no, or the copy was
        `cancelled()`."""
        ...

    def let_go(self, load_id: str) -> None:
        """A model is unloaded: nothing of `load_id` keeps its memory once this returns."""
        ...
