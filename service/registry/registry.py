"""The registry: held models, their one transition point, and the bounded load executor."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from service.errors import (
    ModelLeased,
    ModelNotFound,
    ModelNotReady,
    NameTaken,
    NotShareable,
    RemoteCodeRefused,
)
from service.handles.leases import Lease, LeaseTable
from service.loading.base import Devices
from service.loading.pipeline import LoadContext, discard, resolve, run_load, translate
from service.loading.sources import LocalSource, parse_source
from service.loading.spec import LoadRequest
from service.loading.strategies import get_loader
from service.memory.cuda import CudaProbe
from service.memory.estimate import Estimate, estimate
from service.memory.release import release_memory
from service.registry.gate import MemoryGate, refuse
from service.registry.identity import derived_id, spec_key
from service.registry.record import ErrorInfo, ModelRecord, utcnow
from service.registry.states import ACTIVE, State, check_transition

log = logging.getLogger("basehold.registry")

Listener = Callable[[ModelRecord, State, State], None]


class Registry:
    def __init__(
        self,
        ctx: LoadContext,
        cuda: CudaProbe,
        gate: MemoryGate,
        *,
        max_concurrent_loads: int,
        allow_remote_code: bool,
    ) -> None:
        self._ctx = replace(ctx, admit=self._admit_late)
        self._cuda = cuda
        self.gate = gate
        self._allow_remote_code = allow_remote_code
        self._records: dict[str, ModelRecord] = {}
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_concurrent_loads, thread_name_prefix="load")
        self._listeners: list[Listener] = []
        self.leases = LeaseTable()

    # -- queries ---------------------------------------------------------------------
    def get(self, model_id: str) -> ModelRecord:
        with self._lock:
            record = self._records.get(model_id)
        if record is None:
            raise ModelNotFound(f"No model {model_id!r} is held. GET /v1/models lists them.")
        return record

    def records(self) -> list[ModelRecord]:
        with self._lock:
            return list(self._records.values())

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- load ------------------------------------------------------------------------
    def normalize(self, request: LoadRequest) -> LoadRequest:
        if request.trust_remote_code and not self._allow_remote_code:
            raise RemoteCodeRefused(
                "This server does not run checkpoint code. Drop `trust_remote_code`, or start "
                "the server with BASEHOLD_ALLOW_REMOTE_CODE=true if you trust the source."
            )
        source = parse_source(request.source, request.revision, self._ctx.roots)
        if isinstance(source, LocalSource):
            request = request.model_copy(update={"source": str(source.path), "revision": None})
        else:
            request = request.model_copy(update={"revision": source.revision})
        devices = Devices(cuda_count=self._cuda.device_count())
        return get_loader(request).normalize(request, devices)

    def submit(self, request: LoadRequest, token: str | None) -> tuple[ModelRecord, bool]:
        """Find or start a load. Returns the record and whether a new load was queued."""
        spec = self.normalize(request)
        key = spec_key(spec)
        model_id = spec.name or derived_id(spec, key)
        with self._lock:
            existing = self._find(model_id, key, named=spec.name is not None)
            if existing is not None:
                existing.last_used_at = utcnow()
                return existing, False
        estimate = self._estimate_local(spec)  # outside the lock: builds a meta model
        with self._lock:
            existing = self._find(model_id, key, named=spec.name is not None)
            if existing is not None:
                existing.last_used_at = utcnow()
                return existing, False
            if estimate is not None:
                self._admit(model_id, estimate)
            previous = self._records.get(model_id)
            if previous is not None and previous.state == State.FAILED:
                self._transition(previous, State.GONE)  # a retry replaces the failed record
            record = ModelRecord(id=model_id, name=spec.name, spec=spec, key=key, estimate=estimate)
            record.progress.on_change = lambda _: self._progressed(record)
            self._records[model_id] = record
            self._notify(record, State.GONE, State.QUEUED)  # created: from nothing
            record.future = self._executor.submit(self._run, record, token)
        return record, True

    # -- admission -------------------------------------------------------------------
    def _estimate_local(self, spec: LoadRequest) -> Estimate | None:
        """Estimate local sources at submit, so a load that cannot fit answers 507 at once.
        A checkpoint that cannot even be estimated is left to the load, which fails with
        the precise code."""
        if not spec.source.startswith("/"):
            return None
        try:
            return self._estimate_spec(spec, None)
        except Exception:
            return None

    def _estimate_spec(self, spec: LoadRequest, token: str | None) -> Estimate:
        resolved = resolve(spec, token, self._ctx, config_only=True)
        return estimate(spec, resolved.config, resolved.task)

    def estimate(self, request: LoadRequest, token: str | None) -> tuple[Estimate, dict[str, int]]:
        """POST /v1/estimate: nothing is loaded; hub sources fetch config.json only."""
        result = self._estimate_spec(self.normalize(request), token)
        with self._lock:
            return result, self.gate.free(self._records.values())

    def _admit(self, model_id: str, estimate: Estimate) -> None:
        """Make room or refuse (lock held). Never evicts leased or loading models."""
        while short := self.gate.shortfalls(estimate, self._records.values(), model_id):
            victim = self.gate.victim(self._records.values())
            if victim is None:
                raise refuse(model_id, short)
            log.warning(
                "evicting %s (idle since %s) to make room for %s",
                victim.id,
                victim.last_used_at.isoformat(),
                model_id,
            )
            victim.evicted = True
            self.unload(victim.id)

    def _admit_late(self, model_id: str, estimate_of: Callable[[], Estimate]) -> None:
        """Admission from the load thread, for sources estimated only once fetched."""
        with self._lock:
            record = self._records.get(model_id)
            if record is None or record.estimate is not None:
                return
        late = estimate_of()  # outside the lock: builds a meta model
        with self._lock:
            self._admit(model_id, late)
            record.estimate = late

    def _find(self, model_id: str, key: str, *, named: bool) -> ModelRecord | None:
        current = self._records.get(model_id)
        if named and current is not None and current.state in ACTIVE and current.key != key:
            raise NameTaken(
                f"The name {model_id!r} is held by a different load spec. Pick another name "
                f"or unload it first (DELETE /v1/models/{model_id})."
            )
        if current is not None and current.state in ACTIVE:
            return current
        if not named:
            return next(
                (r for r in self._records.values() if r.key == key and r.state in ACTIVE), None
            )
        return None

    def _run(self, record: ModelRecord, token: str | None) -> None:
        with self._lock:
            if record.progress.cancel.is_set():
                self._transition(record, State.GONE)
                return
            self._transition(record, State.LOADING, started_at=utcnow())
        loaded = None
        failure: ErrorInfo | None = None
        try:
            loaded = run_load(record.id, record.spec, token, self._ctx, record.progress)
        except BaseException as exc:
            failure = self._describe(record, exc)
        with self._lock:
            if loaded is not None and not record.progress.cancel.is_set():
                record.progress.finish()
                self._transition(
                    record,
                    State.READY,
                    model=loaded.model,
                    ready_at=utcnow(),
                    task=loaded.task.value,
                    architecture=loaded.architecture,
                    dtype=loaded.dtype,
                    parameters=loaded.parameters,
                    by_device=loaded.by_device,
                    device_map=loaded.device_map,
                    resolved_revision=loaded.resolved_revision,
                    shareable=loaded.placed.shareable,
                    shareable_reason=loaded.placed.reason,
                    handle=loaded.placed.handle,
                )
                return
        loaded = None
        discard(record.id, self._ctx)
        release_memory(self._cuda)
        with self._lock:
            if record.state == State.CANCELLED:
                self._transition(record, State.GONE)
            else:
                self._transition(record, State.FAILED, error=failure)

    def _describe(self, record: ModelRecord, exc: BaseException) -> ErrorInfo:
        error = translate(exc)
        message = error.message
        if error.code == "internal":
            incident = uuid.uuid4().hex[:12]
            log.error("load of %s failed [incident %s]", record.id, incident, exc_info=exc)
            message = f"{message} (incident {incident}; see the server log)"
        return ErrorInfo(code=error.code, message=message)

    # -- unload ----------------------------------------------------------------------
    def unload(self, model_id: str, *, force: bool = False) -> ModelRecord | None:
        """Unload or cancel. Returns the record while a cancel is still cleaning up,
        None once the model is gone. Blocking: call it from a worker thread."""
        with self._lock:
            record = self.get(model_id)
            if record.state == State.CANCELLED:
                return record
            if record.state in (State.QUEUED, State.LOADING):
                record.progress.cancel.set()
                self._transition(record, State.CANCELLED)
                if record.future is not None and record.future.cancel():
                    self._transition(record, State.GONE)
                    return None
                return record
            if record.state == State.FAILED:
                self._transition(record, State.GONE)
                return None
            if record.leases and not force:
                raise ModelLeased(
                    f"{model_id} has {record.leases} active lease(s). Release them, or unload "
                    "with ?force=true to revoke them."
                )
            revoked = self.leases.revoke_model(model_id)
            for lease in revoked:
                log.warning(
                    "lease %s of %s (holder %s) revoked by a forced unload",
                    lease.id,
                    model_id,
                    lease.holder,
                )
            self._transition(record, State.UNLOADING, model=None, handle=None, leases=0)
        keep_until = max((lease.expires_at for lease in revoked), default=None)
        discard(record.id, self._ctx, keep_until)
        release_memory(self._cuda)
        with self._lock:
            self._transition(record, State.GONE, by_device={})
        return None

    # -- leases --------------------------------------------------------------------------
    def lease(self, model_id: str, holder: str, ttl_seconds: int) -> tuple[Lease, object]:
        """Grant a lease on a ready, shareable model; returns it with the model's handle."""
        with self._lock:
            record = self.get(model_id)
            if record.state != State.READY:
                raise ModelNotReady(
                    f"{model_id} is {record.state.value}; wait until it is ready "
                    f"(GET /v1/models/{model_id})."
                )
            if not record.shareable or record.handle is None:
                raise NotShareable(
                    f"{model_id} cannot be lent to workers: {record.shareable_reason}."
                )
            lease = self.leases.grant(model_id, holder, ttl_seconds)
            record.leases = self.leases.count(model_id)
            record.last_used_at = utcnow()
        log.info("lease %s on %s granted to %s for %ss", lease.id, model_id, holder, ttl_seconds)
        return lease, record.handle

    def renew_lease(self, lease_id: str) -> Lease:
        return self.leases.renew(lease_id)

    def release_lease(self, lease_id: str) -> Lease:
        lease = self.leases.release(lease_id)
        self._recount(lease.model_id)
        log.info("lease %s on %s released by %s", lease.id, lease.model_id, lease.holder)
        return lease

    def expire_leases(self) -> list[Lease]:
        expired = self.leases.expire()
        for lease in expired:
            self._recount(lease.model_id)
            log.warning(
                "lease %s on %s (holder %s) expired: not renewed in %ss",
                lease.id,
                lease.model_id,
                lease.holder,
                lease.ttl_seconds,
            )
        return expired

    def _recount(self, model_id: str) -> None:
        with self._lock:
            record = self._records.get(model_id)
            if record is not None:
                record.leases = self.leases.count(model_id)

    def shutdown(self) -> None:
        """Cancel loads, unload everything, stop the executor (on SIGTERM)."""
        for record in self.records():
            try:
                self.unload(record.id, force=True)
            except ModelNotFound:
                continue
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- the one transition point --------------------------------------------------------
    def _transition(self, record: ModelRecord, target: State, **changes: Any) -> None:
        previous = record.state
        check_transition(previous, target)
        for name, value in changes.items():
            setattr(record, name, value)
        record.state = target
        if target == State.GONE and self._records.get(record.id) is record:
            del self._records[record.id]
        log.info("model %s: %s -> %s", record.id, previous.value, target.value)
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
