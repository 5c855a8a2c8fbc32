"""Leases: who holds a handle to which model, until when. Unrenewed leases expire."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from service.errors import LeaseNotFound


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Lease:
    id: str
    model_id: str
    holder: str
    ttl_seconds: int
    created_at: datetime
    expires_at: datetime


class LeaseTable:
    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def grant(self, model_id: str, holder: str, ttl_seconds: int) -> Lease:
        now = _now()
        lease = Lease(
            id=f"lease-{uuid.uuid4().hex[:16]}",
            model_id=model_id,
            holder=holder,
            ttl_seconds=ttl_seconds,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_seconds),
        )
        with self._lock:
            self._leases[lease.id] = lease
        return lease

    def renew(self, lease_id: str) -> Lease:
        with self._lock:
            lease = self._get(lease_id)
            renewed = replace(lease, expires_at=_now() + timedelta(seconds=lease.ttl_seconds))
            self._leases[lease_id] = renewed
        return renewed

    def release(self, lease_id: str) -> Lease:
        with self._lock:
            lease = self._get(lease_id)
            del self._leases[lease_id]
        return lease

    def _get(self, lease_id: str) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(
                f"No lease {lease_id!r}: it was released, revoked or expired. Take a new one "
                "with POST /v1/models/{id}/leases."
            )
        return lease

    def active(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def count(self, model_id: str) -> int:
        with self._lock:
            return sum(1 for lease in self._leases.values() if lease.model_id == model_id)

    def revoke_model(self, model_id: str) -> list[Lease]:
        with self._lock:
            gone = [lease for lease in self._leases.values() if lease.model_id == model_id]
            for lease in gone:
                del self._leases[lease.id]
        return gone

    def expire(self) -> list[Lease]:
        now = _now()
        with self._lock:
            gone = [lease for lease in self._leases.values() if lease.expires_at <= now]
            for lease in gone:
                del self._leases[lease.id]
        return gone
