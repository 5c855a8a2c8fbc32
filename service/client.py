"""Python client for basehold, for training workers and scripts.

    from service.client import Client
    client = Client("http://127.0.0.1:8000", token=None)
    with client.attach("llama-tiny", holder="trainer-1", ttl_seconds=30) as model:
        ...  # base weights are the service's pages, read-only

While attached, a background thread renews the lease at a third of its TTL; leaving the
block releases it. Only httpx, torch, transformers (and bitsandbytes for 4-bit models) are
imported here: a worker never needs the server's dependencies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from torch import nn
from torch.utils.hooks import RemovableHandle

log = logging.getLogger("basehold.client")
__all__ = ["BaseholdError", "Client", "LeaseLost"]


class BaseholdError(RuntimeError):
    """A problem+json answer from the service, with its stable `code`."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class LeaseLost(RuntimeError):
    """A forward pass on a GPU-attached model whose lease is gone: the service may already
    have given that device memory to something else. Attach again."""


def guard_forward(model: nn.Module, lost: Callable[[], str | None]) -> RemovableHandle:
    """Refuse forward passes once `lost()` names a reason (CPU arenas need no guard: the
    kernel keeps mapped pages; GPU segments are freed by the service after the lease)."""

    def check(module: nn.Module, args: object) -> None:
        reason = lost()
        if reason is not None:
            raise LeaseLost(reason)

    return model.register_forward_pre_hook(check)


def _secret_header(secret: str | None) -> dict[str, str] | None:
    return {"X-Lease-Secret": secret} if secret else None


class _Renewer(threading.Thread):
    def __init__(self, client: Client, lease_id: str, secret: str, ttl_seconds: int) -> None:
        super().__init__(name=f"renew-{lease_id}", daemon=True)
        self._client = client
        self._lease_id = lease_id
        self._secret = secret
        self._every = max(ttl_seconds / 3, 0.2)
        self._stop_event = threading.Event()
        self.lost: BaseholdError | None = None

    def run(self) -> None:
        while not self._stop_event.wait(self._every):
            try:
                self._client.renew(self._lease_id, self._secret)
            except BaseholdError as exc:
                # Revoked (forced unload) or expired: the mapped pages stay valid here, but
                # the service no longer promises to hold the model.
                self.lost = exc
                log.warning("lease %s lost: %s", self._lease_id, exc.detail)
                return
            except httpx.TransportError as exc:
                log.warning("lease %s: renewal failed, retrying: %s", self._lease_id, exc)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


class Client:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            raise BaseholdError(
                response.status_code,
                str(body.get("code", "http_error")),
                str(body.get("detail", response.text)),
            )
        return response.json() if response.content else None

    # -- models -------------------------------------------------------------------------
    def load(self, source: str, *, hf_token: str | None = None, **spec: Any) -> dict[str, Any]:
        """POST /v1/models; returns the ModelStatus (use `wait` for ready)."""
        headers = {"X-HF-Token": hf_token} if hf_token else None
        result: dict[str, Any] = self._call(
            "POST", "/v1/models", json={"source": source, **spec}, headers=headers
        )
        return result

    def wait(self, model_id: str, timeout: float = 3600, poll: float = 0.25) -> dict[str, Any]:
        """Block until the model is ready; raises BaseholdError if the load failed.

        Waits through a restart of the service: while it cannot be reached, or answers
        404 while it is still restoring what it held, this keeps polling until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            status = self._status_through_restart(model_id)
            if status is not None and status["state"] == "ready":
                return status
            if status is not None and status["state"] == "failed":
                error = status["error"]
                raise BaseholdError(422, error["code"], error["message"])
            if time.monotonic() > deadline:
                state = status["state"] if status is not None else "unreachable"
                raise TimeoutError(f"{model_id} is still {state} after {timeout}s")
            time.sleep(poll)

    def _status_through_restart(self, model_id: str) -> dict[str, Any] | None:
        """The model's status, or None while the service restarts or restores."""
        try:
            return self.get(model_id)
        except httpx.TransportError:
            return None
        except BaseholdError as exc:
            if exc.status in (502, 503, 504) or (
                exc.code == "model_not_found" and self.restoring()
            ):
                return None
            raise

    def restoring(self) -> bool:
        """Whether the service is starting or restoring the models it held (GET /readyz)."""
        try:
            return self._http.get("/readyz").status_code == 503
        except httpx.TransportError:
            return True

    def get(self, model_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/models/{model_id}")
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/models")["models"]
        return result

    def unload(self, model_id: str, *, force: bool = False) -> None:
        self._call("DELETE", f"/v1/models/{model_id}", params={"force": str(force).lower()})

    def estimate(self, source: str, **spec: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/estimate", json={"source": source, **spec})
        return result

    def memory(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/memory")
        return result

    # -- leases -------------------------------------------------------------------------
    def lease(self, model_id: str, holder: str, ttl_seconds: int = 60) -> dict[str, Any]:
        """POST a lease: the answer has `lease_id`, `secret` (shown only here) and `handle`."""
        result: dict[str, Any] = self._call(
            "POST",
            f"/v1/models/{model_id}/leases",
            json={"holder": holder, "ttl_seconds": ttl_seconds},
        )
        return result

    def renew(self, lease_id: str, secret: str | None = None) -> dict[str, Any]:
        """Renew with the lease's secret (an admin token needs none)."""
        result: dict[str, Any] = self._call(
            "POST", f"/v1/leases/{lease_id}/renew", headers=_secret_header(secret)
        )
        return result

    def release(self, lease_id: str, secret: str | None = None) -> None:
        self._call("DELETE", f"/v1/leases/{lease_id}", headers=_secret_header(secret))

    @contextmanager
    def attach(self, model_id: str, holder: str, ttl_seconds: int = 60) -> Iterator[nn.Module]:
        """Lease `model_id` and yield an nn.Module on the service's read-only pages."""
        from service.handles.attach import attach_handle

        lease = self.lease(model_id, holder, ttl_seconds)
        lease_id, secret = lease["lease_id"], lease["secret"]
        renewer = _Renewer(self, lease_id, secret, ttl_seconds)
        done = threading.Event()

        def lost() -> str | None:
            if renewer.lost is not None:
                return f"lease {lease_id} on {model_id} was lost: {renewer.lost.detail}"
            if done.is_set():
                return f"the attach block for {model_id} has ended; its lease is released"
            return None

        renewer.start()
        try:
            model = attach_handle(lease["handle"], lease_id, secret)
            if lease["handle"].get("segments"):
                guard_forward(model, lost)
            yield model
        finally:
            done.set()
            renewer.stop()
            if renewer.lost is None:
                self._release_quietly(lease_id, secret, ttl_seconds)

    def _release_quietly(self, lease_id: str, secret: str, ttl_seconds: int) -> None:
        """Leaving an attach block never raises for the release: a lease that is already
        gone is fine, and a service that cannot be reached lets it expire."""
        try:
            self.release(lease_id, secret)
        except BaseholdError as exc:
            if exc.code != "lease_not_found":
                log.warning("lease %s: release refused: %s", lease_id, exc)
        except httpx.TransportError as exc:
            log.warning(
                "lease %s: could not release it (%s); the service drops it after its %ss TTL",
                lease_id,
                exc,
                ttl_seconds,
            )
