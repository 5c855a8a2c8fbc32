"""The worker's renewer: only the service's word about the lease loses it."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from service.worker.client import BaseholdError, _lease_is_gone
from service.worker.lease_state import LeaseLost, LeaseState, Renewer


def lease(ttl: int = 1) -> LeaseState:
    return LeaseState(
        "lease-1", "m", "w", ttl, expires_at=datetime.now(timezone.utc) + timedelta(seconds=ttl)
    )


def run(state: LeaseState, renew: Callable[[], datetime], until: Callable[[], bool]) -> None:
    renewer = Renewer(state, renew, _lease_is_gone, "warn")
    renewer.start()
    deadline = time.monotonic() + 30
    try:
        while not until():
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
    finally:
        renewer.stop()


@pytest.mark.parametrize(
    "failure",
    [
        BaseholdError(503, "restoring", "the service is starting"),
        BaseholdError(429, "too_many_requests", "slow down"),
        BaseholdError(408, "timeout", "slow"),
        BaseholdError(500, "internal", "oops"),
        httpx.ConnectError("connection refused"),
    ],
    ids=["503", "429", "408", "500", "transport"],
)
def test_passing_failures_are_retried(failure: Exception) -> None:
    # TTL 1 s: renewals every 1/3 s, so the four calls take ~1.3 s (TTL 3 s: ~2.8 s).
    state = lease(ttl=1)
    calls = {"n": 0}

    def renew() -> datetime:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise failure
        return datetime.now(timezone.utc) + timedelta(seconds=1)

    run(state, renew, lambda: calls["n"] >= 4)
    assert state.state == "active" and not state.lost


@pytest.mark.parametrize(
    ("status", "said", "reason"),
    [
        (404, "unloaded", "unloaded"),
        (404, "revoked", "revoked"),
        (404, "expired", "expired"),
        (404, None, "expired"),  # a service that no longer knows the lease
        (403, None, "revoked"),  # its secret no longer counts
    ],
)
def test_the_services_word_about_the_lease_loses_it(
    status: int, said: str | None, reason: str
) -> None:
    state = lease()
    detail = "Lease 'lease-1' ended: its model was unloaded"

    def renew() -> datetime:
        raise BaseholdError(status, "lease_not_found", detail, said)

    with pytest.warns(UserWarning, match=f"was lost \\({reason}\\): {detail}"):
        run(state, renew, lambda: state.lost)
    assert (state.reason, state.detail) == (reason, detail)


def test_retrying_goes_on_past_the_expiry_until_the_service_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A service down for longer than the TTL restores the lease with a fresh one: the
    worker keeps it."""
    state = lease(ttl=1)
    down_until = time.monotonic() + 2.5
    calls = {"after": 0}

    def renew() -> datetime:
        if time.monotonic() < down_until:
            raise httpx.ConnectError("connection refused")
        calls["after"] += 1
        return datetime.now(timezone.utc) + timedelta(seconds=1)

    run(state, renew, lambda: calls["after"] >= 2)
    assert state.state == "active"
    assert "not renewed before its expiry" in caplog.text


def test_a_callback_gets_the_loss_before_forward_passes_raise() -> None:
    from transformers import TrainerControl, TrainerState

    from service.worker.callback import LeaseCallback

    state = lease()
    assert state.forward_refusal() is None
    plain = lease()
    plain.state, plain.reason = "lost", "revoked"
    assert plain.forward_refusal() is not None  # no callback: the next forward raises
    callback = LeaseCallback(state, "base", None)
    state.state, state.reason, state.detail = "lost", "unloaded", "revoked by a forced unload"
    assert state.forward_refusal() is None  # the step in flight may finish
    control = callback.on_step_end(None, TrainerState(global_step=7), TrainerControl())
    assert control.should_save and control.should_training_stop
    assert state.forward_refusal() is not None  # training goes on: now it raises
    assert "revoked by a forced unload" in str(state.forward_refusal())


def test_a_lost_lease_has_an_exit_code_of_its_own() -> None:
    """What a job exits with after saving its checkpoint (docs/jobs.md): EX_TEMPFAIL, which
    a Job's podFailurePolicy tells from a crash (1) and from a setting to fix (EX_CONFIG)."""
    from service.client import LeaseLost as Exported
    from service.worker import exit_codes

    assert Exported is LeaseLost
    assert LeaseLost("gone").exit_code == exit_codes.LEASE_LOST == 75
    assert exit_codes.CONFIG == 78
    assert len({1, exit_codes.LEASE_LOST, exit_codes.CONFIG}) == 3
