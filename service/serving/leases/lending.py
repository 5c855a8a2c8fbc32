"""Lending held models to training workers: grant, renew, release and expire leases, and
hand a lease's holder the model's arena.

Leases live here, not in the registry; the registry only asks "is this model leased?"
(`LeaseTable.count`) and revokes them on a forced unload. Every call may write the state
database: call these from worker threads, never on the event loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.common.errors import LeaseForbidden, TooManyLeases
from service.common.handles.descriptor import Handle
from service.serving.leases.leases import Lease, LeaseTable
from service.serving.loaders.arenas import HeldArenas
from service.serving.registry.record import ModelRecord
from service.serving.registry.registry import Registry
from service.serving.socket.server import Peer

log = logging.getLogger("basehold.handles")


@dataclass(frozen=True)
class Grant:
    lease: Lease
    secret: str  # shown once, in the grant's answer
    handle: Handle


class Lending:
    def __init__(
        self,
        registry: Registry,
        table: LeaseTable,
        placement: HeldArenas,
        max_leases_per_model: int,
        max_leases_per_holder: int,
    ) -> None:
        self.registry = registry
        self.table = table
        self.placement = placement
        self.max_leases_per_model = max_leases_per_model
        self.max_leases_per_holder = max_leases_per_holder

    def grant(
        self,
        model_id: str,
        holder: str,
        ttl_seconds: int,
        *,
        key: str | None = None,
        max_per_key: int | None = None,
    ) -> Grant:
        """A lease on a ready, shareable model, with its secret and the model's handle.
        `key`, `max_per_key`: the asking API key's fingerprint and its cap of leases on
        one model (`LeaseTable.grant`)."""

        def take(record: ModelRecord) -> tuple[Lease, str]:
            held = self.table.count(record.id)
            if held >= self.max_leases_per_model:
                raise TooManyLeases(
                    f"{record.id} already has {held} leases (BASEHOLD_MAX_LEASES_PER_MODEL="
                    f"{self.max_leases_per_model}). Release leases you no longer use, or "
                    "ask the operator to raise the limit."
                )
            mine = self.table.count_holder(holder)
            if mine >= self.max_leases_per_holder:
                raise TooManyLeases(
                    f"{holder!r} already holds {mine} leases (BASEHOLD_MAX_LEASES_PER_HOLDER="
                    f"{self.max_leases_per_holder}). Release leases you no longer use, or "
                    "ask the operator to raise the limit."
                )
            return self.table.grant(
                record.id, holder, ttl_seconds, key=key, max_per_key=max_per_key
            )

        (lease, secret), handle = self.registry.lend(model_id, take)
        log.info("lease %s on %s granted to %s for %ss", lease.id, model_id, holder, ttl_seconds)
        return Grant(lease, secret, handle)

    def renew(self, lease_id: str, secret: str | None, *, admin: bool = False) -> Lease:
        if not admin:
            self.table.check(lease_id, secret)
        return self.table.renew(lease_id)

    def release(self, lease_id: str, secret: str | None, *, admin: bool = False) -> Lease:
        # With its secret, the holder releases it; without, an admin revokes it.
        try:
            self.table.check(lease_id, secret)
            by_holder = True
        except LeaseForbidden:
            if not admin:
                raise
            by_holder = False
        lease = self.table.release(lease_id, "released" if by_holder else "revoked")
        self.registry.recount(lease.model_id)
        log.info(
            "lease %s on %s %s",
            lease.id,
            lease.model_id,
            f"released by {lease.holder}" if by_holder else "revoked by an admin",
        )
        return lease

    def arena_fds(self, lease_id: str, secret: str, peer: Peer) -> list[int]:
        """For the arena socket: new fds of the leased model's arena and device segments,
        if `secret` is the lease's (the caller sends and closes them). They open in any
        PID namespace: a memfd, and CUDA VMM allocations exported as POSIX fds."""
        lease = self.table.check(lease_id, secret)

        def fds_for(record: ModelRecord) -> list[int]:
            return self.placement.dup_fds(record.load_id)

        # Fetching the arena of a granted lease is not a new use: no write, no recount.
        fds, _ = self.registry.while_lendable(lease.model_id, fds_for)
        log.info(
            "arena of %s sent to %s (lease %s, holder %s)",
            lease.model_id,
            peer,
            lease.id,
            lease.holder,
        )
        return fds

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
