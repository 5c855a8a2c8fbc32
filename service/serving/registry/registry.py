"""The registry: held models, their one transition point, and the bounded load executor.

A load is a sequence the registry drives: an estimate (a helper process; no lock) → admit
under the lock (one admission path for every source; eviction victims are chosen and
marked there) → victims' memory released *after* the lock is let go → a loader process,
followed from an executor thread until it hands over the model's fds and manifest. Hub
sources are priced from their metadata, before any download; a load that could not be
priced at submit is admitted when its loader asks, before it reads or downloads any
weight. Nothing slow ever runs under the lock, so async routes that read the registry
never wait behind an unload. Loaders are reached through a `LoaderBackend`
(`service.serving.registry.backend`): loader processes in the service, scripted in-process loads
in the registry's tests.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from service.common.cuda import CudaProbe
from service.common.errors import (
    BaseholdError,
    InsufficientMemory,
    InvalidSpec,
    LoadCancelled,
    LoaderCrashed,
    ModelLeased,
    ModelNotFound,
    ModelNotReady,
    NameTaken,
    NotShareable,
    RemoteCodeRefused,
    SourceNotAllowed,
)
from service.common.estimates import Estimate
from service.common.load.normalize import Devices, normalize
from service.common.load.sources import LocalSource, parse_source
from service.common.load.spec import LoadRequest
from service.common.protocol.held import Held
from service.common.protocol.wire import close_fds
from service.serving.memory.admission import Measured
from service.serving.registry.backend import L, LoaderBackend, RunningLoad, SnapshotSource
from service.serving.registry.downloads import require_disk
from service.serving.registry.gate import MemoryGate, refuse
from service.serving.registry.identity import MODEL_ID, derived_id, spec_key
from service.serving.registry.persist import Persistence
from service.serving.registry.prices import Prices
from service.serving.registry.record import (
    Adopted,
    ErrorInfo,
    ModelRecord,
    new_load_id,
    utcnow,
)
from service.serving.registry.states import ACTIVE, State, check_transition
from service.serving.state.database import ModelRow
from service.serving.state.writer import OrderedWriter, WriterLock

log = logging.getLogger("basehold.registry")

Listener = Callable[[ModelRecord, State, State], None]
T = TypeVar("T")


class LeaseBook(Protocol):
    """What the registry asks of the leases (they live in `service.serving.leases`)."""

    def count(self, model_id: str) -> int: ...

    def revoke_model(self, model_id: str) -> list[Any]: ...

    def hold_until(self, model_id: str) -> datetime | None:
        """Until when leases that ended may still read the model's device memory."""
        ...


class Registry:
    def __init__(
        self,
        loaders: LoaderBackend[L],
        cuda: CudaProbe,
        gate: MemoryGate,
        leases: LeaseBook,
        *,
        max_concurrent_loads: int,
        allow_remote_code: bool,
        writer: OrderedWriter | None = None,
        snapshots: SnapshotSource | None = None,
    ) -> None:
        self._loaders: LoaderBackend[Any] = loaders
        self._cuda = cuda
        self.gate = gate
        self._leases = leases
        self._allow_remote_code = allow_remote_code
        self._records: dict[str, ModelRecord] = {}
        # Alias -> model id: one copy per spec, under every name it was asked for.
        self._aliases: dict[str, str] = {}
        # Nothing slow under it: probes run before it is taken, and state database writes
        # decided under it run once it is let go (`WriterLock`).
        self.writer = writer or OrderedWriter()
        self._lock = WriterLock(self.writer)
        self._executor = ThreadPoolExecutor(max_concurrent_loads, thread_name_prefix="load")
        self._max_loads = max_concurrent_loads
        self._loads_pending = 0  # submitted to the executor and not done
        self._prices = Prices(cuda)
        self._listeners: list[Listener] = []
        # Loads waiting for `start_deferred`, with the token each runs with: restored ones,
        # and (`_deferring`: a successor before it holds the state lock) new ones.
        self._deferred: list[tuple[ModelRecord, str | None]] = []
        self._deferring = False
        self._persistence: Persistence | None = None
        self._snapshots = snapshots

    # -- queries ---------------------------------------------------------------------
    def get(self, model_id: str) -> ModelRecord:
        """The model of that id, or of which it is an alias."""
        with self._lock:
            record = self._records.get(self._resolve(model_id))
        if record is None:
            raise ModelNotFound(f"No model {model_id!r} is held. GET /v1/models lists them.")
        return record

    def records(self) -> list[ModelRecord]:
        with self._lock:
            return list(self._records.values())

    def restoring(self) -> int:
        """Restored models that have not settled yet (ready or failed)."""
        with self._lock:
            return sum(1 for r in self._records.values() if r.restoring)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def silence(self) -> None:
        """Tell listeners nothing from now on (a handover: the models live on in the
        successor, so the node's feature labels, events and metrics must not hear them
        unloaded here)."""
        with self._lock:
            self._listeners = []

    def persist_to(self, persistence: Persistence) -> None:
        """Write every transition through from now on (set at startup, lock held)."""
        self._persistence = persistence

    # -- load ------------------------------------------------------------------------
    def normalize(self, request: LoadRequest, devices: Devices | None = None) -> LoadRequest:
        """`request` as this server runs it (its source resolved, its defaults filled in
        for `devices`: by default what the serving process sees now), or the refusal."""
        if request.trust_remote_code and not self._allow_remote_code:
            raise RemoteCodeRefused(
                "This server does not run checkpoint code. Drop `trust_remote_code`, or start "
                "the server with BASEHOLD_ALLOW_REMOTE_CODE=true if you trust the source."
            )
        source = parse_source(request.source, request.revision, self._loaders.roots)
        if isinstance(source, LocalSource):
            request = request.model_copy(update={"source": str(source.path), "revision": None})
        else:
            request = request.model_copy(update={"revision": source.revision})
        return normalize(request, devices if devices is not None else Devices.of(self._cuda))

    def submit(self, request: LoadRequest, token: str | None) -> tuple[ModelRecord, bool]:
        """Find or start a load. Returns the record and whether a new load was queued.
        Loads are priced and admitted here, so one that cannot fit answers 507 at once
        (hub sources from their metadata, before any download); one that could not be
        priced is admitted by its loader before it reads or downloads any weight."""
        spec = self.normalize(request)
        key = spec_key(spec)
        model_id = spec.name or derived_id(spec, key)
        named = spec.name is not None
        pin = spec.pinned
        if (existing := self._existing(model_id, key, named=named, pin=pin)) is not None:
            return existing, False
        load_id = new_load_id(model_id)
        prepared, estimate = self._price_first(model_id, load_id, spec, key, token)  # no lock
        try:
            measured = self.gate.measure() if estimate is not None else None  # probes
            with self._lock:  # again: another request may have started it meanwhile
                existing = self._existing(model_id, key, named=named, pin=pin)
                if existing is None:
                    record = ModelRecord(
                        id=model_id, name=spec.name, spec=spec, key=key, load_id=load_id
                    )
                    victims: list[ModelRecord] = []
                    if estimate is not None and measured is not None:
                        victims = self._admit(record, estimate, measured)
                    record.loader = prepared  # an unload kills it, even while queued
                    self._add(record)
            if existing is not None:
                self._end(prepared)  # waits for it: not under the lock
                return existing, False
        except BaseException:
            self._end(prepared)  # refused: it never reads a weight
            raise
        self._evict(victims)
        with self._lock:
            if self._deferring:  # the predecessor still ends its own loads: queued till then
                self._deferred.append((record, token))
                return record, True
        self._start(record, token)
        return record, True

    def restore(
        self,
        rows: list[ModelRow],
        adopted: Mapping[str, Adopted] | None = None,
        *,
        start: bool = True,
    ) -> list[ModelRecord]:
        """Queue the models a previous process held under their ids: pinned and leased
        ones first, then the others, most recently used first. A model in `adopted` (a
        predecessor handed over its memory) is ready at once, without a load; its fds are
        this registry's from now on (closed if it cannot be kept). `start=False`: the
        loads wait for `start_deferred` (a successor whose predecessor still ends its
        own), and so do the loads submitted until then. Each recorded spec goes through
        the same normalization and policy as `POST /v1/models` today (not the day it was
        recorded): one the server now refuses (remote code no longer allowed, a device
        that is gone, a source outside the roots) ends `failed` with its usual code, and
        its leases end with it. The others are admitted and loaded like any hub load; one
        that cannot come back ends `failed`."""
        restored: list[ModelRecord] = []
        now = utcnow()
        devices = Devices.of(self._cuda)  # once (NVML): the same for every row
        for row in rows:
            if not MODEL_ID.fullmatch(row.id):
                log.error("not restoring %r: not a model id basehold gives", row.id[:80])
                self._forget(row.id)
                continue
            try:
                spec = LoadRequest.model_validate(row.spec)
            except ValidationError as exc:
                log.error("not restoring %s: its recorded spec is invalid (%s)", row.id, exc)
                self._forget(row.id)
                continue
            record = ModelRecord(
                id=row.id,
                name=row.name if row.name == row.id else None,
                spec=spec,
                key=row.spec_key,
                queued_at=row.queued_at,
                last_used_at=row.last_used_at,
                restored_at=now,
                aliases=[a for a in row.aliases if MODEL_ID.fullmatch(a)],
            )
            with self._lock:
                record.leases = self._leases.count(record.id)
                try:
                    self._add(record)
                except NameTaken as exc:  # a load of that id is active already: it stays
                    log.error("not restoring %s: %s", record.id, exc.message)
                    continue
                for alias in record.aliases:
                    self._aliases.setdefault(alias, record.id)
            try:
                record.spec = self.normalize(spec, devices)
                record.key = spec_key(record.spec)
            except BaseholdError as exc:
                log.error("not restoring %s: %s (%s)", record.id, exc.message, exc.code)
                self._fail(record, ErrorInfo(code=exc.code, message=exc.message))
                continue
            restored.append(record)
        adopted = dict(adopted or {})
        loads = [r for r in restored if not self._adopt(r, adopted.pop(r.id, None))]
        for model_id, left in adopted.items():  # the state does not list it: not kept
            log.error("not keeping the handed-over memory of %s: it is not restored", model_id)
            close_fds(left.fds)
        # Pinned and leased models first (jobs wait on them), then most recently used:
        # the executor runs them in this order, as many at once as it runs loads.
        with self._lock:
            # Those with a snapshot come first: a copy from the disk, not a load.
            ordered = sorted(
                loads,
                key=lambda r: (not self._has_snapshot(r), not (r.spec.pinned or r.leases > 0)),
            )
            # restored hub loads use the server's HF_TOKEN
            self._deferred.extend((record, None) for record in ordered)
            self._deferring = not start
        if start:
            self.start_deferred()
        return restored

    def start_deferred(self) -> None:
        """Start the loads `restore(start=False)` left waiting, and those submitted since,
        in that order; new ones start at once from now on."""
        with self._lock:
            deferred, self._deferred = self._deferred, []
            self._deferring = False
        for record, token in deferred:
            self._start(record, token)

    def _adopt(self, record: ModelRecord, adopted: Adopted | None) -> bool:
        """Keep what a predecessor handed over for `record`: ready at once (True), or
        False when there is nothing (or nothing usable) to keep: it is loaded again."""
        if adopted is None:
            return False
        try:
            held, runner = self._loaders.adopt(
                record.id,
                adopted.load_id,
                record.spec,
                adopted.facts,
                adopted.fds,
                adopted.runner,
            )
        except ValueError as exc:  # its fds are closed
            log.error("not keeping the handed-over memory of %s (%s): loading it", record.id, exc)
            return False
        except Exception:
            close_fds(adopted.fds)
            log.exception("not keeping the handed-over memory of %s: loading it", record.id)
            return False
        with self._lock:
            let_go = record.state != State.QUEUED  # unloaded while its snapshot was copied
            if not let_go:
                record.load_id = adopted.load_id
                record.admitted = True
                self._transition(record, State.LOADING, started_at=adopted.started_at)
                record.progress.finish()
                self._transition(record, State.READY, loaded=held, ready_at=adopted.ready_at)
                if runner is not None:
                    record.loader = runner
        if let_go:
            self._loaders.discard(adopted.load_id)
            with self._lock:
                if record.state == State.CANCELLED:  # as `_run` ends a cancelled load
                    self._transition(record, State.GONE)
            return True
        if runner is not None:
            self._watch(record, runner)  # it may have died meanwhile: failed at once
        return True

    def rewrite_all(self) -> None:
        """Write every active record's row as it is now, and forget the rows of models
        that ended (a handover that did not happen: what changed while the state database
        was frozen)."""
        with self._lock:
            if self._persistence is None:
                return
            active = {r.id: r for r in self._records.values() if r.state in ACTIVE}
            for record in active.values():
                self._persistence.rewrite(record)
            for model_id in self._persistence.recorded() - set(active):
                self._persistence.forget(model_id)

    def _forget(self, model_id: str) -> None:
        with self._lock:  # the write runs as it is let go
            if self._persistence is not None:
                self._persistence.forget(model_id)

    def _fail(self, record: ModelRecord, failure: ErrorInfo | None) -> None:
        """`record` ends failed (lock taken here), or gone if it was cancelled meanwhile;
        leases restored for it end with it."""
        with self._lock:
            if record.state == State.CANCELLED:
                self._transition(record, State.GONE)
                return
            for lease in self._leases.revoke_model(record.id):
                log.warning("lease %s of %s ended: the model failed to load", lease.id, record.id)
            record.leases = 0
            self._transition(record, State.FAILED, error=failure)

    def _resolve(self, name: str) -> str:
        """The model id `name` stands for (lock held): itself, unless it is an alias."""
        return name if name in self._records else self._aliases.get(name, name)

    def _alias(self, name: str, record: ModelRecord) -> None:
        """`name` now answers with `record` (lock held): a POST of its spec named so."""
        self._aliases[name] = record.id
        record.aliases.append(name)
        log.info("model %s: %s is now an alias of it (the same load spec)", record.id, name)
        if self._persistence is not None:
            self._persistence.rewrite(record)
        self._notify(record, record.state, record.state)

    def _drop_alias(self, name: str) -> None:
        """Forget an alias (lock held); the model stays under its id and other names."""
        record = self._records.get(self._aliases.pop(name))
        if record is not None and name in record.aliases:
            record.aliases.remove(name)
            if self._persistence is not None:
                self._persistence.rewrite(record)
            self._notify(record, record.state, record.state)

    def _existing(
        self, model_id: str, key: str, *, named: bool, pin: bool = False
    ) -> ModelRecord | None:
        """The active record this request names, now counted as used, and pinned if the
        request says so (None: load it)."""
        with self._lock:
            existing = self._find(model_id, key, named=named)
            if existing is not None:
                self._touch(existing)
                if pin and not existing.spec.pinned:
                    existing.spec = existing.spec.model_copy(update={"pinned": True})
                    log.info("model %s pinned: never evicted", existing.id)
                    if self._persistence is not None:
                        self._persistence.rewrite(existing)
                    self._notify(existing, existing.state, existing.state)
            return existing

    def _add(self, record: ModelRecord) -> None:
        """Insert a new record (lock held); a failed one of the same id is replaced, an
        active one never is (two loads of one id, one orphaned): callers check first."""
        previous = self._records.get(record.id)
        if previous is not None and previous.state in ACTIVE:
            raise NameTaken(
                f"{record.id} is {previous.state.value} already; unload it first "
                f"(DELETE /v1/models/{record.id})."
            )
        if previous is not None and previous.state == State.FAILED:
            self._transition(previous, State.GONE)
        record.progress.on_change = lambda _: self._progressed(record)
        self._records[record.id] = record
        if self._persistence is not None:
            self._persistence.on_transition(record, State.GONE, State.QUEUED)
        self._notify(record, State.GONE, State.QUEUED)  # created: from nothing

    def _start(self, record: ModelRecord, token: str | None) -> None:
        with self._lock:
            self._loads_pending += 1
        future = self._executor.submit(self._run, record, token)
        with self._lock:
            record.future = future
        future.add_done_callback(self._load_ended)  # also when cancelled before it ran

    def _load_ended(self, _: Future[None]) -> None:
        with self._lock:
            self._loads_pending -= 1

    def _price_first(
        self, model_id: str, load_id: str, spec: LoadRequest, key: str, token: str | None
    ) -> tuple[Any, Estimate | None]:
        """Every load is priced at submit: a local checkpoint checked in full, a hub source
        from its metadata (config, safetensors headers, the cache's free disk: nothing
        downloaded). Where a load could start at once, by the load itself (returned,
        waiting for `go`: the checkpoint is resolved and checked once); else by a helper
        process, and the load starts when its turn comes. A request the server refuses (a
        file outside the roots, remote code, an impossible spec) is answered at once, and
        so by admission is one that does not fit in memory or on the cache's disk; anything
        else (a gated repo, a hub that does not answer, broken files) is left to the load,
        which fails with the precise code, or admits it late. A local load priced before,
        with the same files, takes that price (`Prices`) and starts no process here."""
        remembered = self._prices.key(spec, key)
        if (known := self._prices.get(remembered)) is not None:
            return None, known
        with self._lock:
            now = self._loads_pending < self._max_loads
        try:
            if now:
                prepared, estimate = self._loaders.prepare(model_id, load_id, spec, token)
            else:
                prepared, estimate = None, self._loaders.estimate(spec, token, full=True)
        except (SourceNotAllowed, RemoteCodeRefused, InvalidSpec):
            raise
        except Exception:
            return None, None
        self._prices.put(remembered, estimate)
        return prepared, estimate

    @staticmethod
    def _end(loader: RunningLoad | None) -> None:
        """Kill a load that will not go on, wait for it and let it go."""
        if loader is not None:
            loader.kill()
            loader.wait(5)
            loader.close()

    def estimate(
        self, request: LoadRequest, token: str | None, *, server_token: bool = True
    ) -> tuple[Estimate, dict[str, int]]:
        """POST /v1/estimate: nothing is loaded; hub sources fetch config.json only.
        `server_token`: without `token`, the server's own hub token may be used. A local
        checkpoint priced before with the same files is answered from `Prices` (its price
        comes from the config either way)."""
        spec = self.normalize(request)
        remembered = self._prices.key(spec, spec_key(spec))
        result = self._prices.get(remembered)
        if result is None:
            result = self._loaders.estimate(spec, token, full=False, server_token=server_token)
            self._prices.put(remembered, result)
        measured = self.gate.measure()
        with self._lock:
            return result, self.gate.free(self._records.values(), measured)

    # -- admission -------------------------------------------------------------------
    def _admit(
        self, record: ModelRecord, estimate: Estimate, measured: Measured
    ) -> list[ModelRecord]:
        """Admit `record` or raise InsufficientStorage (its download does not fit beside
        those in flight) or InsufficientMemory (lock held; `measured` was probed before it
        was taken). Evicts only when that makes the load fit, and never leased
        or loading models. Victims are marked unloading here; their memory is released by
        the caller after the lock is let go."""
        records = list(self._records.values())
        if estimate.download is not None:
            require_disk(estimate.download, records, exclude=record.id)
        short = self.gate.shortfalls(estimate, records, measured, exclude=record.id)
        victims: list[ModelRecord] = []
        for candidate in self.gate.candidates(records) if short else []:
            victims.append(candidate)
            short = self.gate.shortfalls(
                estimate, records, measured, exclude=record.id, freed=victims
            )
            if not short:
                break
        if short:
            raise refuse(record.id, short)
        record.estimate = estimate
        record.admitted = True
        for victim in victims:
            log.warning(
                "evicting %s (idle since %s) to make room for %s",
                victim.id,
                victim.last_used_at.isoformat(),
                record.id,
            )
            victim.evicted = True
            self._transition(victim, State.UNLOADING)
        return victims

    def _evict(self, victims: list[ModelRecord]) -> None:
        for victim in victims:
            self._release(victim, None)

    def _find(self, model_id: str, key: str, *, named: bool) -> ModelRecord | None:
        """The active record of this name (or alias) and spec; else one of the same spec,
        under another name: one copy per spec, the new name becomes its alias."""
        current = self._records.get(self._resolve(model_id))
        if named and current is not None and current.state in ACTIVE and current.key != key:
            raise NameTaken(
                f"The name {model_id!r} is held by a different load spec. Pick another name "
                f"or unload it first (DELETE /v1/models/{model_id})."
            )
        if current is not None and current.state in ACTIVE:
            return current
        same = next((r for r in self._records.values() if r.key == key and r.state in ACTIVE), None)
        if same is not None and named:
            self._alias(model_id, same)
        return same

    def _has_snapshot(self, record: ModelRecord) -> bool:
        return self._snapshots is not None and self._snapshots.has(record.id)

    def _from_snapshot(self, record: ModelRecord) -> bool:
        """A restored model held again from its snapshot, ready without a load (True); False
        when it has none that agrees (or it was let go meanwhile)."""
        if self._snapshots is None or record.restored_at is None or record.loader is not None:
            return False
        with self._lock:
            if record.state != State.QUEUED or record.progress.cancel.is_set():
                return False
        cancelled = record.progress.cancel.is_set

        def admit(size: int) -> bool:  # what any restored load is: admitted, maybe evicting
            try:
                self._admit_late(record, Estimate(size, {"cpu": size}, 0))
            except LoadCancelled:
                return False
            except InsufficientMemory as exc:
                log.warning("not restoring %s from its snapshot (%s): loading it", record.id, exc)
                return False
            return True

        try:
            adopted = self._snapshots.take(record.id, record.key, cancelled, admit)
            if adopted is not None and self._adopt(record, adopted):
                return True
        except Exception:  # it is loaded instead
            log.exception("restoring %s from its snapshot failed; loading it", record.id)
        with self._lock:  # the load prices (and is admitted for) itself
            record.admitted, record.estimate = False, None
        return False

    def _run(self, record: ModelRecord, token: str | None) -> None:
        if self._from_snapshot(record):
            return
        with self._lock:
            prepared, record.loader = record.loader, None  # priced itself at submit
            cancelled = record.progress.cancel.is_set()
            if cancelled:
                self._transition(record, State.GONE)
            else:
                self._transition(record, State.LOADING, started_at=utcnow())
        if cancelled:
            self._end(prepared)  # waits for it: not under the lock
            return
        held: Held | None = None
        loader: RunningLoad | None = None
        failure: ErrorInfo | None = None
        try:
            pin = record.estimate.pin if record.estimate is not None else None
            if prepared is not None and self._loaders.go(prepared):
                loader = prepared
            else:  # it waited too long and ended: another, admitted already
                self._end(prepared)
                loader = self._loaders.start(
                    record.id, record.load_id, record.spec, token, record.admitted, pin
                )
            with self._lock:
                record.loader = loader
                cancelled = record.progress.cancel.is_set()
            if cancelled:
                loader.kill()
            held = self._loaders.drive(
                loader, record.progress, lambda e: self._admit_late(record, e)
            )
        except BaseException as exc:
            failure = self._describe(record, exc)
        with self._lock:
            ready = held is not None and not record.progress.cancel.is_set()
            if held is not None and ready:
                record.progress.finish()
                self._transition(record, State.READY, loaded=held, ready_at=utcnow())
        if ready and loader is not None and held is not None:
            if held.needs_runner:
                self._watch(record, loader)
            else:
                loader.wait(5)  # it exits once it handed over its fds (an unload waits too)
                loader.close()
            return
        self._end(loader)
        self._loaders.discard(record.load_id)
        self._fail(record, failure)

    def _admit_late(self, record: ModelRecord, estimate: Estimate) -> None:
        """A hub load's loader fetched the checkpoint and asks before reading weights. A
        load cancelled meanwhile (even while memory was probed) is admitted nowhere and
        evicts nothing: `LoadCancelled`."""
        measured = self.gate.measure()
        with self._lock:
            record.progress.check_cancelled()  # set under this lock by an unload
            victims = self._admit(record, estimate, measured)
        self._evict(victims)

    def _watch(self, record: ModelRecord, runner: RunningLoad) -> None:
        """A runner that dies while its model is ready turns the model failed."""

        def watch() -> None:
            runner.wait()
            self._runner_ended(record, runner)

        threading.Thread(target=watch, name=f"runner-{record.id}", daemon=True).start()

    def _runner_ended(self, record: ModelRecord, runner: RunningLoad) -> None:
        with self._lock:
            if record.state != State.READY or self._records.get(record.id) is not record:
                return  # unloaded (we ended it) or superseded
            how = runner.ended()
            log.error("the runner of %s %s", record.id, how)
            for lease in self._leases.revoke_model(record.id):
                log.warning("lease %s of %s ended: its runner died", lease.id, record.id)
            record.leases = 0
            error = LoaderCrashed(
                f"The runner process holding {record.id} {how}; its memory is gone. Nothing "
                "else was affected. Unload it and load it again; see the server log."
            )
            self._transition(record, State.FAILED, error=ErrorInfo(error.code, error.message))
        self._loaders.discard(record.load_id)

    def _describe(self, record: ModelRecord, exc: BaseException) -> ErrorInfo:
        error = (
            exc if isinstance(exc, BaseholdError) else BaseholdError(f"{type(exc).__name__}: {exc}")
        )
        message = error.message
        if error.code == "internal":
            incident = uuid.uuid4().hex[:12]
            log.error("load of %s failed [incident %s]", record.id, incident, exc_info=exc)
            message = f"{message} (incident {incident}; see the server log)"
        return ErrorInfo(code=error.code, message=message)

    # -- unload ----------------------------------------------------------------------
    def unload(self, model_id: str, *, force: bool = False) -> ModelRecord | None:
        """Unload or cancel. Returns the record while it is still being unloaded or
        cancelled (also to a concurrent second request), None once the model is gone.
        Blocking: call it from a worker thread."""
        with self._lock:
            if model_id not in self._records and model_id in self._aliases:
                self._drop_alias(model_id)  # the name goes; the model stays for the others
                return None
            record = self.get(model_id)
            if record.state in (State.UNLOADING, State.CANCELLED):
                return record
            leased = self._leases.count(model_id)
            if leased and not force:
                raise ModelLeased(
                    f"{model_id} has {leased} active lease(s). Release them, or unload "
                    "with ?force=true to revoke them."
                )
            revoked = self._leases.revoke_model(model_id)
            for lease in revoked:
                log.warning(
                    "lease %s of %s (holder %s) revoked by a forced unload",
                    lease.id,
                    model_id,
                    lease.holder,
                )
            record.leases = 0
            if record.state in (State.QUEUED, State.LOADING):
                record.progress.cancel.set()
                if record.loader is not None:
                    record.loader.kill()  # the kernel takes back all it held
                self._transition(record, State.CANCELLED)
                if self._undefer(record) or (record.future is not None and record.future.cancel()):
                    if record.loader is not None:  # it priced itself and never ran
                        record.loader.close()
                    self._transition(record, State.GONE)
                    return None
                return record
            if record.state == State.FAILED:
                self._transition(record, State.GONE)
                return None
            self._transition(record, State.UNLOADING)
            ended = self._leases.hold_until(model_id)
        holds = [lease.expires_at for lease in revoked] + ([ended] if ended else [])
        self._release(record, max(holds, default=None))
        return None

    def _undefer(self, record: ModelRecord) -> bool:
        """Take `record` off the loads waiting for `start_deferred` (lock held); whether
        it was there."""
        for index, (waiting, _) in enumerate(self._deferred):
            if waiting is record:
                del self._deferred[index]
                return True
        return False

    def _release(self, record: ModelRecord, keep_until: datetime | None) -> None:
        """Free an unloading model's memory (lock not held), then it is gone."""
        if self._snapshots is not None:  # a snapshot being written holds its arena
            self._snapshots.let_go(record.load_id)
        self._loaders.discard(record.load_id, keep_until)
        with self._lock:
            self._transition(record, State.GONE)

    # -- leases ------------------------------------------------------------------------
    def lend(self, model_id: str, take: Callable[[ModelRecord], T]) -> tuple[T, Any]:
        """Run `take` (grant a lease) while `model_id` is ready and shareable, atomically
        with unloads; the model counts as used. Returns `take`'s result and the handle."""
        with self._lock:
            model_id = self._resolve(model_id)
            result, handle = self.while_lendable(model_id, take)
            record = self.get(model_id)
            record.leases = self._leases.count(model_id)
            self._touch(record)
            return result, handle

    def while_lendable(self, model_id: str, use: Callable[[ModelRecord], T]) -> tuple[T, Any]:
        """Run `use` while `model_id` is ready and shareable, atomically with unloads;
        returns its result and the model's handle."""
        with self._lock:
            record = self.get(model_id)
            if record.state != State.READY or record.loaded is None:
                raise ModelNotReady(
                    f"{model_id} is {record.state.value}; wait until it is ready "
                    f"(GET /v1/models/{model_id})."
                )
            placed = record.loaded.placed
            if not placed.shareable or placed.handle is None:
                raise NotShareable(f"{model_id} cannot be lent to workers: {placed.reason}.")
            return use(record), placed.handle

    def recount(self, model_id: str) -> None:
        """The leases of `model_id` changed: refresh the count its status shows."""
        with self._lock:
            record = self._records.get(model_id)
            if record is not None:
                record.leases = self._leases.count(model_id)

    def shutdown(self) -> None:
        """Cancel loads, unload everything, stop the executor (on SIGTERM). What the state
        database holds is left as it is (the app stops persisting first), so the next
        start restores these models."""
        self.let_go()
        self._loaders.close()

    def let_go(self) -> None:
        """Cancel loads and unload everything (what the database holds stays as it is);
        the loader template stays until `shutdown` (a handover lets go of the memory
        first, releases the state lock, then ends the template)."""
        for record in self.records():
            try:
                self.unload(record.id, force=True)
            except ModelNotFound:
                continue
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- the one transition point --------------------------------------------------------
    def _touch(self, record: ModelRecord) -> None:
        """A POST of the same spec or a lease: the model was used (eviction order)."""
        record.last_used_at = utcnow()
        if self._persistence is not None:
            self._persistence.touch(record)

    def _transition(self, record: ModelRecord, target: State, **changes: Any) -> None:
        previous = record.state
        check_transition(previous, target)
        for name, value in changes.items():
            if not hasattr(record, name):
                raise AttributeError(f"ModelRecord has no field {name!r}")
            setattr(record, name, value)
        record.state = target
        current = self._records.get(record.id) is record
        if target == State.GONE and current:
            del self._records[record.id]
            for alias in record.aliases:
                self._aliases.pop(alias, None)
        log.info("model %s: %s -> %s", record.id, previous.value, target.value)
        # Write through; a superseded record (same id, a newer load) never touches the row.
        if self._persistence is not None and current:
            self._persistence.on_transition(record, previous, target)
        self._notify(record, previous, target)

    def _progressed(self, record: ModelRecord) -> None:
        """Progress moved: listeners hear it as (state -> same state), at most 10 times a
        second per model."""
        now = time.monotonic()
        if now - record.progress_notified_at >= 0.1:
            record.progress_notified_at = now
            self._notify(record, record.state, record.state)

    def _notify(self, record: ModelRecord, previous: State, target: State) -> None:
        for listener in self._listeners:
            try:
                listener(record, previous, target)
            except Exception:
                log.exception("state listener failed for %s", record.id)
