"""Worker side: what an attached model knows about its lease, and the thread that renews it.

`model.basehold_lease` is a `LeaseState`: `state` ("active", "lost", "released"),
`expires_at`, `lost`, `reason`. The renewer renews at a third of the TTL; a refusal
(403/404: revoked by a forced unload, expired) marks the lease lost, while a service that
cannot be reached or answers 408/429/5xx (restarting, busy) is retried with backoff, past
the expiry too (a restarted service restores the lease with a fresh TTL). What a lost
lease does to forward passes is the attach's `on_lost` choice: "warn" (a warning,
training goes on: on the CPU the mapped pages stay valid) or "raise" (`LeaseLost` from
the next forward). On a GPU a lost lease always raises: the service may reuse that
device memory.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

from service.worker.exit_codes import LEASE_LOST

if TYPE_CHECKING:  # torch is imported by what attaches, not by this module
    from torch import nn
    from torch.utils.hooks import RemovableHandle

log = logging.getLogger("basehold.client")
OnLost = Literal["warn", "raise"]
# Why a lease ended: the service's word (`unloaded`: a forced unload or a failed load;
# `revoked`: an admin; `expired`: not renewed in its TTL), or `released` by this worker.
Reason = Literal["unloaded", "revoked", "expired", "released"]
_SERVICE_REASONS: dict[object, Reason] = {
    "unloaded": "unloaded",
    "revoked": "revoked",
    "expired": "expired",
}


class LeaseLost(RuntimeError):
    """A forward pass on an attached model whose lease is gone (revoked, expired, or its
    attach block ended). Attach again. A job that catches it saves a checkpoint and exits
    with `exit_code` (`exit_codes.LEASE_LOST`), so its scheduler retries it on a new lease."""

    exit_code: int = LEASE_LOST


@dataclass
class LeaseState:
    lease_id: str
    model_id: str
    holder: str
    ttl_seconds: int
    expires_at: datetime | None = None
    state: Literal["active", "lost", "released"] = "active"
    reason: Reason | None = None
    detail: str | None = None  # the service's sentence about the loss
    # A TrainerCallback (`Client.lease_callback`) stops training at the next step boundary
    # with a checkpoint: until it has, a loss does not fail the step in flight.
    deferred: bool = False
    stopped: bool = False

    @property
    def lost(self) -> bool:
        return self.state == "lost"

    def forward_refusal(self) -> str | None:
        """Why a forward pass must not run now (None: it may). A lost lease lets the step
        in flight finish when a callback will stop training at its end (the service keeps
        a revoked or expired lease's memory for one more TTL); after that, it refuses."""
        if self.state == "lost" and self.deferred and not self.stopped:
            return None
        return self.why_not_usable()

    def why_not_usable(self) -> str | None:
        if self.state == "lost":
            lease = f"lease {self.lease_id} on {self.model_id}"
            return f"{lease} was lost ({self.reason}): {self.detail}"
        if self.state == "released":
            return f"the attach block for {self.model_id} has ended; its lease is released"
        return None


def lease_of(model: nn.Module) -> LeaseState:
    """The lease state of a model from `Client.attach` (typed `model.basehold_lease`)."""
    lease = getattr(model, "basehold_lease", None)
    if not isinstance(lease, LeaseState):
        raise TypeError("this model did not come from Client.attach: it has no basehold lease")
    return lease


def guard_forward(model: nn.Module, lost: Callable[[], str | None]) -> RemovableHandle:
    """Refuse forward passes once `lost()` names a reason."""

    def check(module: nn.Module, args: object) -> None:
        reason = lost()
        if reason is not None:
            raise LeaseLost(reason)

    return model.register_forward_pre_hook(check)


class Renewer(threading.Thread):
    """Renews `lease` every TTL/3 with `renew()`, which returns the new expiry. A failure
    that `is_final` says is an answer about the lease (403, 404: revoked, expired,
    released) loses it at once; anything else (a 503 while the service restarts, 429,
    a timeout, a refused connection) is retried with backoff. Retrying goes on past the
    lease's expiry: a restarted service restores its leases with a fresh TTL, so only its
    own answer can say the lease is gone (past the expiry a warning says so, once)."""

    def __init__(
        self,
        lease: LeaseState,
        renew: Callable[[], datetime],
        is_final: Callable[[Exception], bool],
        on_lost: OnLost,
    ) -> None:
        super().__init__(name=f"renew-{lease.lease_id}", daemon=True)
        self.lease = lease
        self._renew = renew
        self._is_final = is_final
        self._on_lost = on_lost
        self._every = max(lease.ttl_seconds / 3, 0.2)
        self._stop_event = threading.Event()

    def run(self) -> None:
        wait, backoff, overdue = self._every, 0.25, False
        while not self._stop_event.wait(wait):
            try:
                self.lease.expires_at = self._renew()
            except Exception as exc:
                if self._is_final(exc):
                    self._lose(exc)
                    return
                if not overdue and self._past_expiry():
                    overdue = True
                    log.warning(
                        "lease %s: not renewed before its expiry (%s); still trying: a "
                        "restarted service restores it",
                        self.lease.lease_id,
                        exc,
                    )
                else:
                    log.info("lease %s: renewal failed, retrying: %s", self.lease.lease_id, exc)
                wait, backoff = backoff, min(backoff * 2, self._every)
                continue
            wait, backoff, overdue = self._every, 0.25, False

    def _past_expiry(self) -> bool:
        expires = self.lease.expires_at
        return expires is not None and expires <= datetime.now(timezone.utc)

    def _lose(self, exc: Exception) -> None:
        # A 404 without a reason: the service no longer knows the lease (restarted past
        # its expiry); a 403: its secret no longer counts.
        unsaid: Reason = "revoked" if getattr(exc, "status", 404) == 403 else "expired"
        self.lease.reason = _SERVICE_REASONS.get(getattr(exc, "reason", None), unsaid)
        self.lease.detail = str(getattr(exc, "detail", exc))
        message = (
            f"basehold lease {self.lease.lease_id} on {self.lease.model_id} was lost "
            f"({self.lease.reason}): {self.lease.detail}"
        )
        log.warning(message)
        if self._on_lost == "warn":
            warnings.warn(message + " (the mapped weights stay valid on the CPU)", stacklevel=1)
        self.lease.state = "lost"  # last: whoever sees it lost finds it said too

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
