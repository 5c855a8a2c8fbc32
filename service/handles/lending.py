"""Lending held models to training workers: grant, renew, release and expire leases.

Leases live here, not in the registry; the registry only asks "is this model leased?"
(`LeaseTable.count`) and revokes them on a forced unload. Every call may write the state
database: call these from worker threads, never on the event loop.
"""

from __future__ import annotations

import logging

from service.handles.descriptor import Handle
from service.handles.leases import Lease, LeaseTable
from service.registry.record import ModelRecord
from service.registry.registry import Registry

log = logging.getLogger("basehold.handles")


class Lending:
    def __init__(self, registry: Registry, table: LeaseTable) -> None:
        self.registry = registry
        self.table = table

    def grant(self, model_id: str, holder: str, ttl_seconds: int) -> tuple[Lease, Handle]:
        """A lease on a ready, shareable model, with the model's handle."""

        def take(record: ModelRecord) -> Lease:
            return self.table.grant(record.id, holder, ttl_seconds)

        lease, handle = self.registry.lend(model_id, take)
        log.info("lease %s on %s granted to %s for %ss", lease.id, model_id, holder, ttl_seconds)
        return lease, handle

    def renew(self, lease_id: str) -> Lease:
        return self.table.renew(lease_id)

    def release(self, lease_id: str) -> Lease:
        lease = self.table.release(lease_id)
        self.registry.recount(lease.model_id)
        log.info("lease %s on %s released by %s", lease.id, lease.model_id, lease.holder)
        return lease

    def expire(self) -> list[Lease]:
        expired = self.table.expire()
        for lease in expired:
            self.registry.recount(lease.model_id)
            log.warning(
                "lease %s on %s (holder %s) expired: not renewed in %ss",
                lease.id,
                lease.model_id,
                lease.holder,
                lease.ttl_seconds,
            )
        return expired
