"""Leases: who holds a handle to which model, until when. Unrenewed leases expire.

A lease is a capability: its secret is returned once, at grant, and only its SHA-256 is
kept (here and in the state database). Renewing, releasing and fetching the arena need the
secret. The table writes through to the state database (when given one), so leases
survive a restart with their ids and secrets: a worker renews into the restarted service.

A grant may name the API key that asked for it (a fingerprint, never the key) with a cap:
one key holds at most that many leases on one model, whatever holder names it sends. The
fingerprint is kept with the lease (and in the state database): leases restored after a
restart still count for their key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Literal

from service.common.errors import LeaseForbidden, LeaseNotFound, TooManyLeases
from service.serving.state.database import LeaseRow, StateDB
from service.serving.state.writer import OrderedWriter, WriterLock


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# The longest TTL a lease may have (a request asking for more answers 422).
MAX_TTL_SECONDS = 3600

# A lease is exactly what the state database keeps of it (the secret only as a hash).
Lease = LeaseRow
# Why a lease ended, as a renewal of it is told: its model was unloaded (forced, or it
# failed), an admin revoked it, it was not renewed in its TTL, or its holder released it.
EndReason = Literal["unloaded", "revoked", "expired", "released"]
ENDED_KEPT = 4096  # ended leases remembered (in memory) to tell their holders why


class LeaseTable:
    """`grace_seconds`: how long a model's device segments outlive its last released lease
    (a slow worker may still be reading them)."""

    def __init__(self, grace_seconds: float = 30.0, writer: OrderedWriter | None = None) -> None:
        self._leases: dict[str, Lease] = {}
        # Database writes decided under it run once it (and any registry lock this thread
        # holds around it) is let go: share the registry's writer.
        self._lock = WriterLock(writer or OrderedWriter())
        self._db: StateDB | None = None
        self._grace = timedelta(seconds=grace_seconds)
        self._holds: dict[str, datetime] = {}
        self._ended: OrderedDict[str, EndReason] = OrderedDict()

    def persist_to(self, db: StateDB) -> None:
        """Write through to `db` from now on (set at startup, state lock held)."""
        self._db = db

    def restore(self, rows: list[LeaseRow], models: set[str]) -> list[Lease]:
        """Take back the leases a previous process granted on `models` (others are
        dropped). Their holders could not renew while the service was down, so each gets a
        full TTL from now, and no more: a recorded expiry or TTL beyond the service's
        maximum (a row nobody granted) is cut down to it."""
        now = _now()
        kept, dropped = [], []
        for row in rows:
            if row.model_id not in models:
                dropped.append(row.id)
                continue
            ttl = min(max(row.ttl_seconds, 1), MAX_TTL_SECONDS)
            kept.append(replace(row, ttl_seconds=ttl, expires_at=now + timedelta(seconds=ttl)))
        with self._lock:
            for lease in kept:
                self._leases[lease.id] = lease
                self._put(lease)
            self._delete(dropped)
        return kept

    def grant(
        self,
        model_id: str,
        holder: str,
        ttl_seconds: int,
        *,
        key: str | None = None,
        max_per_key: int | None = None,
    ) -> tuple[Lease, str]:
        """A new lease and its secret (shown once; only its hash is kept). `key`: the
        fingerprint of the API key asking (None: no cap applies); it may hold at most
        `max_per_key` leases on `model_id` (else TooManyLeases)."""
        now = _now()
        secret = secrets.token_urlsafe(32)
        lease = Lease(
            id=f"lease-{uuid.uuid4().hex[:16]}",
            model_id=model_id,
            holder=holder,
            ttl_seconds=ttl_seconds,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_seconds),
            secret_hash=_hash(secret),
            key=key,
        )
        with self._lock:
            if key is not None and max_per_key is not None:
                held = self._count_key(model_id, key)
                if held >= max_per_key:
                    raise TooManyLeases(
                        f"This API key already holds {held} leases on {model_id} "
                        f"(BASEHOLD_MAX_LEASES_PER_KEY={max_per_key}), whatever their holder "
                        "names. Release leases you no longer use (DELETE /v1/leases/{id} "
                        "with its secret; Client.attach releases its lease when its block "
                        "ends), or ask the operator to raise the limit."
                    )
            self._leases[lease.id] = lease
            self._put(lease)
        return lease, secret

    def count_key(self, model_id: str, key: str) -> int:
        """Active leases on `model_id` taken with the API key of fingerprint `key`."""
        with self._lock:
            return self._count_key(model_id, key)

    def _count_key(self, model_id: str, key: str) -> int:
        return sum(
            1 for lease in self._leases.values() if (lease.model_id, lease.key) == (model_id, key)
        )

    def check(self, lease_id: str, secret: str | None) -> Lease:
        """The lease, if `secret` is its secret; else LeaseForbidden (or LeaseNotFound)."""
        lease = self.get(lease_id)
        expected = lease.secret_hash or ""
        if not secret or not hmac.compare_digest(_hash(secret), expected):
            raise LeaseForbidden(
                f"Lease {lease_id} needs its secret: send the `secret` returned when the lease "
                "was granted in the X-Lease-Secret header (service.worker.client does), or use an "
                "admin key."
            )
        return lease

    def renew(self, lease_id: str) -> Lease:
        with self._lock:
            lease = self._get(lease_id)
            renewed = replace(lease, expires_at=_now() + timedelta(seconds=lease.ttl_seconds))
            self._leases[lease_id] = renewed
            self._put(renewed)
        return renewed

    def release(self, lease_id: str, reason: EndReason = "released") -> Lease:
        """End a lease before its time: its holder released it (or an admin revoked it)."""
        with self._lock:
            lease = self._get(lease_id)
            del self._leases[lease_id]
            self._ended_now([lease_id], reason)
            self._delete([lease_id])
            self._hold(lease.model_id, _now() + self._grace)
        return lease

    def _ended_now(self, lease_ids: list[str], reason: EndReason) -> None:
        for lease_id in lease_ids:
            self._ended[lease_id] = reason
            self._ended.move_to_end(lease_id)
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def _hold(self, model_id: str, until: datetime) -> None:
        self._holds[model_id] = max(until, self._holds.get(model_id, until))

    def hold_until(self, model_id: str) -> datetime | None:
        """Until when an unload must keep the model's device segments for leases that have
        ended: a grace after a release, one more TTL after an expiry (the worker's renewer
        notices within a third of it and stops its forward passes)."""
        with self._lock:
            until = self._holds.get(model_id)
            if until is not None and until <= _now():
                del self._holds[model_id]
                return None
            return until

    def get(self, lease_id: str) -> Lease:
        with self._lock:
            return self._get(lease_id)

    def _get(self, lease_id: str) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            reason = self._ended.get(lease_id)
            why = {
                "unloaded": "ended: its model was unloaded (by force, or its load failed)",
                "revoked": "revoked by an admin",
                "expired": "expired: it was not renewed within its TTL",
                "released": "released by its holder",
                None: "is not known here: it was released, revoked or expired",
            }[reason]
            raise LeaseNotFound(
                f"Lease {lease_id!r} {why}. Take a new one with POST /v1/models/{{id}}/leases "
                "(Client.attach does).",
                reason=reason,
            )
        return lease

    def active(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def count(self, model_id: str) -> int:
        with self._lock:
            return sum(1 for lease in self._leases.values() if lease.model_id == model_id)

    def count_holder(self, holder: str) -> int:
        """Active leases of `holder`, on any model."""
        with self._lock:
            return sum(1 for lease in self._leases.values() if lease.holder == holder)

    def revoke_model(self, model_id: str) -> list[Lease]:
        """End every lease on a model that is being unloaded (or failed)."""
        return self._drop(lambda lease: lease.model_id == model_id, "unloaded")

    def expire(self) -> list[Lease]:
        now = _now()
        expired = self._drop(lambda lease: lease.expires_at <= now, "expired")
        with self._lock:
            for lease in expired:
                self._hold(lease.model_id, now + timedelta(seconds=lease.ttl_seconds))
        return expired

    def _drop(self, which: Callable[[Lease], bool], reason: EndReason) -> list[Lease]:
        with self._lock:
            gone = [lease for lease in self._leases.values() if which(lease)]
            for lease in gone:
                del self._leases[lease.id]
            self._ended_now([lease.id for lease in gone], reason)
            self._delete([lease.id for lease in gone])
        return gone

    def rewrite_all(self) -> None:
        """Write every lease as it is now and delete the rows of those that ended (a
        handover that did not happen: what changed while the database was frozen)."""
        with self._lock:
            db = self._db
            if db is None:
                return
            for lease in self._leases.values():
                self._put(lease)
            self._delete([row.id for row in db.leases() if row.id not in self._leases])

    def _put(self, lease: Lease) -> None:
        db = self._db
        if db is not None:
            self._lock.writer.submit(lambda: db.put_lease(lease))

    def _delete(self, lease_ids: list[str]) -> None:
        db, ids = self._db, list(lease_ids)
        if db is not None and ids:
            self._lock.writer.submit(lambda: db.delete_leases(ids))
