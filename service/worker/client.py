"""Python client for basehold, for training workers and scripts.

    from service.worker.client import Client
    client = Client()          # $BASEHOLD_URL (default http://127.0.0.1:8000), $BASEHOLD_TOKEN
    tokenizer = client.tokenizer("llama-q4")           # over HTTP, no shared filesystem
    with client.attach("llama-q4") as model:           # waits for ready; holder: host-pid
        trainer = SFTTrainer(model=model, processing_class=tokenizer, ...,
                             callbacks=[client.lease_callback(model)])
        trainer.train()

While attached, a background thread renews the lease at a third of its TTL; leaving the
block releases it. `model.basehold_lease` tells the lease's state. Importing this module
and its HTTP-only calls (load, ensure, wait, status, leases) import no torch; `attach`
and the tokenizer/config helpers bring torch and transformers (and bitsandbytes for 4-bit
models) when called: a worker never needs the server's dependencies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx

from service.worker.changes import Changes
from service.worker.gpu import GpuNotFound, VisibleGpus, check_segments, resolve, torch_gpus
from service.worker.lease_state import (
    LeaseLost,
    LeaseState,
    OnLost,
    Renewer,
    guard_forward,
    lease_of,
)
from service.worker.timing import phase

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

    from service.common.handles.devices import DeviceSegments

log = logging.getLogger("basehold.client")
DEFAULT_URL = "http://127.0.0.1:8000"
# A wrong address fails within this, not the read timeout: waiting is for models.
CONNECT_TIMEOUT_S = 5.0
__all__ = [
    "BaseholdError",
    "Client",
    "GpuNotFound",
    "LeaseLost",
    "LeaseState",
    "ServiceUnreachable",
    "default_holder",
    "keep_base_out_of_ddp",
    "lease_of",
]


class BaseholdError(RuntimeError):
    """A problem+json answer from the service, with its stable `code`."""

    def __init__(self, status: int, code: str, detail: str, reason: str | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.reason = reason  # lease_not_found: why the lease ended


class ServiceUnreachable(ConnectionError):
    """The service was never reached at this Client's URL (refused, no such host, connect
    timeout): a wrong address, not a restart, so nothing waits for it."""

    def __init__(self, url: str, cause: Exception) -> None:
        super().__init__(
            f"cannot reach basehold at {url} ({type(cause).__name__}: {cause or 'no answer'}). "
            "Check the URL (the CLI's --url, BASEHOLD_URL, Client(base_url=...)) and that the "
            "service runs."
        )
        self.url = url


# A lease refused for these reasons may be granted after `Client.wait`: loading, failed
# (the wait raises its problem), absent (waited for) or restoring after a restart.
_NOT_LENDABLE_YET = frozenset({"model_not_ready", "model_not_found"})

# What httpx raises when no connection to the address could be made at all.
_NEVER_CONNECTED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)


def _secret_header(secret: str | None) -> dict[str, str] | None:
    return {"X-Lease-Secret": secret} if secret else None


def _synchronize_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _lease_is_gone(exc: Exception) -> bool:
    """Only the service's word about the lease loses it: 403 (its secret no longer
    counts) or 404 (revoked, expired, released). 408/429/5xx and transport errors pass."""
    return isinstance(exc, BaseholdError) and exc.status in (403, 404)


def keep_base_out_of_ddp(module: nn.Module) -> list[str]:
    """Name an attached base's tensors (inside any wrapper, e.g. a PeftModel) in
    DistributedDataParallel's ignore list; not needed: every
    DistributedDataParallel built after an attach does it (`service.worker.ddp`); kept for
    jobs that call it. Returns the names."""
    from service.worker.moves import keep_base_out_of_ddp as keep

    return keep(module)


def default_holder() -> str:
    """`hostname-pid`: who holds a lease when the caller does not say."""
    return f"{socket.gethostname()}-{os.getpid()}"[:128]


class _Absence:
    """A waited-for model that does not exist yet: said once, in the log."""

    def __init__(self, model_id: str, timeout: float) -> None:
        self.model_id = model_id
        self.timeout = timeout
        self.said = False

    def say(self) -> None:
        if not self.said:
            log.warning(
                "basehold: model %r does not exist yet; waiting up to %.0f s for it "
                "(Client.ensure with its load request, or POST /v1/models, would load it)",
                self.model_id,
                self.timeout,
            )
        self.said = True


class Client:
    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        socket_path: str | None = None,
        gpus: Callable[[], VisibleGpus] = torch_gpus,
    ) -> None:
        """`base_url` defaults to `$BASEHOLD_URL` (else http://127.0.0.1:8000) and `token`
        to `$BASEHOLD_TOKEN` (pass "" for none), as the `basehold` CLI reads them.
        `socket_path`: where this worker sees the service's socket, when its mount differs
        from the service's path (which handles name); without it, `$BASEHOLD_SOCKET` where
        that socket exists (an image's default for its service, say, may not be this
        worker's mount), else the handle's path.

        A URL this Client never reached fails within `connect_timeout` with
        ServiceUnreachable naming it; once the service answered, `wait`, `ensure` and
        `attach` ride out its restarts. `gpus`: the GPUs this process sees (default:
        torch's view); "this-gpu" in a load request names the current one, and `attach`
        checks a model's segments are on one of them."""
        self.url = (base_url or os.environ.get("BASEHOLD_URL") or DEFAULT_URL).rstrip("/")
        if token is None:
            token = os.environ.get("BASEHOLD_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Timeout(timeout, connect=min(timeout, connect_timeout))
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=limits)
        self._gpus = gpus
        self.socket_path = socket_path
        self._connected = False  # whether any connection to the service was ever made

    def _socket_seen(self) -> str | None:
        """The socket path to use instead of the handle's: `socket_path`, else
        $BASEHOLD_SOCKET if a socket is there (None: the handle's)."""
        if self.socket_path:
            return self.socket_path
        setting = os.environ.get("BASEHOLD_SOCKET")
        return setting if setting and os.path.exists(setting) else None

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP request. A transport error before this Client ever connected is a
        wrong address (ServiceUnreachable); after, a restart the callers may ride out."""
        try:
            response = self._http.request(method, path, **kwargs)
        except _NEVER_CONNECTED as exc:
            if not self._connected:
                raise ServiceUnreachable(self.url, exc) from exc
            raise
        except httpx.TransportError:
            self._connected = True  # it connected, then the peer hung up or went silent
            raise
        self._connected = True
        return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response, or the problem it answers as a BaseholdError."""
        response = self._request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            raise BaseholdError(
                response.status_code,
                str(body.get("code", "http_error")),
                str(body.get("detail", response.text)),
                body.get("reason") if isinstance(body.get("reason"), str) else None,
            )
        return response

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    # -- models -------------------------------------------------------------------------
    def load(self, source: str, *, hf_token: str | None = None, **spec: Any) -> dict[str, Any]:
        """POST /v1/models; returns the ModelStatus (use `wait` for ready).
        `device_map="this-gpu"` names the GPU this process sees (see `ensure`)."""
        headers = {"X-HF-Token": hf_token} if hf_token else None
        body = resolve({"source": source, **spec}, self._gpus)
        result: dict[str, Any] = self._call("POST", "/v1/models", json=body, headers=headers)
        return result

    def ensure(
        self, request: dict[str, Any], *, timeout: float = 3600, hf_token: str | None = None
    ) -> dict[str, Any]:
        """Load-if-absent: `request` is a LoadRequest (the JSON body of POST /v1/models, as
        a dict). The service answers the model it already has for the same normalized
        spec, so jobs that ensure one spec at once cause one load. Waits until the model is
        ready (through a restart of a service it reached) and returns its ModelStatus; raises
        BaseholdError with the model's problem if the load failed.

        `"device_map": "this-gpu"` (or as a device_map value, or a max_memory key) asks
        for the GPU this process sees, by its UUID: a job the scheduler put on some GPU
        gets its base held on that same GPU. Raises GpuNotFound if it sees none."""
        headers = {"X-HF-Token": hf_token} if hf_token else None
        request = resolve(request, self._gpus)
        deadline = time.monotonic() + timeout
        while True:
            try:
                status: dict[str, Any] = self._call(
                    "POST", "/v1/models", json=request, headers=headers
                )
                break
            except (httpx.TransportError, BaseholdError) as exc:
                passing = isinstance(exc, httpx.TransportError) or exc.status in (502, 503, 504)
                if not passing or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return self.wait(status["id"], timeout=max(0.0, deadline - time.monotonic()))

    def wait(
        self, model_id: str, timeout: float = 3600, poll: float = 0.25, *, absent_ok: bool = False
    ) -> dict[str, Any]:
        """Block until the model is ready; raises BaseholdError if the load failed.

        The status is read again whenever the service's event stream says the model
        changed (`service.worker.changes`), so a load is seen ready as soon as it is; every
        `poll` seconds while there is no stream. Waits through a restart of the service:
        while it cannot be reached, or answers 404 while it is still restoring what it
        held, this keeps trying until `timeout`. A URL this Client never reached raises
        ServiceUnreachable at once instead. `absent_ok`: a model that does not exist yet is
        waited for too (a job started before its base was loaded); a log line says so,
        once."""
        deadline = time.monotonic() + timeout
        absent = _Absence(model_id, timeout) if absent_ok else None
        with contextlib.ExitStack() as stack:
            changes: Changes | None = None  # subscribed once the first read is not the end
            while True:
                if changes is not None:
                    changes.arm()
                status = self._read_waited(model_id, absent)
                if status is not None and changes is not None:
                    changes.track(status["id"])  # `model_id` may be an alias of it
                if status is not None and status["state"] == "ready":
                    return status
                if status is not None and status["state"] == "failed":
                    error = status["error"]
                    raise BaseholdError(422, error["code"], error["message"])
                if time.monotonic() > deadline:
                    state = status["state"] if status is not None else "unreachable"
                    state = "absent" if absent is not None and absent.said else state
                    raise TimeoutError(f"{model_id} is still {state} after {timeout}s")
                if changes is None:  # read once more when subscribed: nothing goes unheard
                    changes = stack.enter_context(Changes(self._http, model_id))
                else:
                    changes.wait(poll, deadline - time.monotonic())

    def _read_waited(self, model_id: str, absent: _Absence | None) -> dict[str, Any] | None:
        """The status of a model waited for; None while it cannot be had (a restart, or
        absent where `absent` says that may be waited out)."""
        try:
            status = self._status_through_restart(model_id)
        except BaseholdError as exc:
            if absent is None or exc.code != "model_not_found":
                raise
            absent.say()
            return None
        return status

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
            return self._request("GET", "/readyz").status_code == 503
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
        """Release with the lease's secret; without one (an admin key) it is a revoke:
        the holder's next renew hears `reason: revoked`."""
        self._call("DELETE", f"/v1/leases/{lease_id}", headers=_secret_header(secret))

    def leases(self) -> list[dict[str, Any]]:
        """GET /v1/leases: the active leases (never a secret)."""
        result: list[dict[str, Any]] = self._call("GET", "/v1/leases")["leases"]
        return result

    @contextmanager
    def attach(
        self,
        model_id: str | None = None,
        holder: str | None = None,
        ttl_seconds: int = 60,
        *,
        on_lost: OnLost = "warn",
        wait: float = 600.0,
        devices: DeviceSegments | None = None,
        spec: dict[str, Any] | None = None,
    ) -> Iterator[PreTrainedModel]:
        """Wait until `model_id` is ready (up to `wait` seconds, also while it does not
        exist yet), lease it and yield an nn.Module on the service's sealed pages. With
        `spec` (a LoadRequest dict) instead of a model id, `ensure` it first. `holder`
        defaults to `hostname-pid`.

        `model.basehold_lease` is the lease's state. If the lease is lost (revoked by a
        forced unload, expired), `on_lost="warn"` warns and lets training go on (on the
        CPU the mapped pages stay valid), `on_lost="raise"` makes the next forward raise
        `LeaseLost`. On a GPU a lost lease always raises; a model on a GPU this process
        does not see raises GpuNotFound, naming both GPUs."""
        from service.common.handles.devices import CUDA
        from service.worker.attach import attach_handle
        from service.worker.moves import guard_moves

        model_id, grant = self._lease_when_ready(
            model_id, spec, wait, holder or default_holder(), ttl_seconds
        )
        lease_id, secret = grant["lease_id"], grant["secret"]
        lease = LeaseState(
            lease_id=lease_id,
            model_id=model_id,
            holder=grant["holder"],
            ttl_seconds=ttl_seconds,
            expires_at=datetime.fromisoformat(grant["expires_at"]),
        )

        def renew() -> datetime:
            return datetime.fromisoformat(self.renew(lease_id, secret)["expires_at"])

        with phase("renewer"):
            renewer = Renewer(lease, renew, _lease_is_gone, on_lost)
            renewer.start()
        model: nn.Module | None = None
        try:
            if devices is None and grant["handle"].get("segments"):
                # Before mapping anything: name both GPUs, not a driver error.
                check_segments(grant["handle"], self._gpus())
            handle = grant["handle"]
            seen = self._socket_seen()  # the worker's own view of the socket (its mount)
            if seen:
                handle = {**handle, "arena": {**handle["arena"], "socket": seen}}
            model = attach_handle(handle, lease_id, secret, devices or CUDA)
            model.basehold_lease = lease  # type: ignore[assignment]
            with phase("guards"):
                guard_moves(model, model_id)
                if grant["handle"].get("segments") or on_lost == "raise":
                    guard_forward(model, lease.forward_refusal)
            yield cast("PreTrainedModel", model)  # built by transformers from the config
        finally:
            renewer.stop()
            if not lease.lost:
                lease.state, lease.reason = "released", "released"  # forwards refused now
                if grant["handle"].get("segments"):
                    # Our references go, and every kernel that read the segment has
                    # finished, before the service may free it.
                    model = None
                    _synchronize_cuda()
                self._release_quietly(lease_id, secret, ttl_seconds)

    def _lease_when_ready(
        self,
        model_id: str | None,
        spec: dict[str, Any] | None,
        wait: float,
        holder: str,
        ttl_seconds: int,
    ) -> tuple[str, dict[str, Any]]:
        """The model's id and a lease on it, once it is ready. A model named by id is
        leased at once: the usual case, a ready model, costs one round trip, not a status
        GET first. An answer that it is not ready yet, absent or restoring (or a restart
        under way) falls back to waiting as `_ready` does, then leasing (a grant whose answer
        a dropped connection lost expires after its TTL, as any unrenewed lease does)."""
        if spec is None and model_id is not None:
            try:
                with phase("lease_http"):
                    return model_id, self.lease(model_id, holder, ttl_seconds)
            except httpx.TransportError:
                pass
            except BaseholdError as exc:
                if exc.code not in _NOT_LENDABLE_YET and exc.status not in (502, 503, 504):
                    raise
        with phase("ready_http"):
            model_id = self._ready(model_id, spec, wait)
        with phase("lease_http"):
            return model_id, self.lease(model_id, holder, ttl_seconds)

    def _ready(self, model_id: str | None, spec: dict[str, Any] | None, wait: float) -> str:
        """The id of the ready model `model_id` names, or `spec` ensures."""
        if spec is None:
            if model_id is None:
                raise ValueError("attach needs a model id or a spec (a LoadRequest dict)")
            self.wait(model_id, timeout=wait, absent_ok=True)
            return model_id
        ensured: str = self.ensure(spec, timeout=wait)["id"]
        if model_id is not None and model_id != ensured:
            raise ValueError(f"the spec names the model {ensured!r}, not {model_id!r}")
        return ensured

    def lease_callback(self, model: nn.Module) -> Any:
        """A `transformers.TrainerCallback` for a model from `attach`: saves a checkpoint
        and stops training when the lease is lost, and names the base model (hub id and
        revision) in the PEFT config the adapter is saved with."""
        from service.worker.callback import LeaseCallback

        lease = lease_of(model)
        provenance = getattr(model, "basehold_provenance", {}) or {}
        name = str(getattr(model, "name_or_path", "") or lease.model_id)
        return LeaseCallback(lease, name, provenance.get("revision"))

    # -- checkpoint files ------------------------------------------------------------------
    def files(self, model_id: str, *, wait: float = 600.0) -> Path:
        """The checkpoint's tokenizer, generation and model config files, fetched over HTTP
        into a private cache (`$BASEHOLD_CACHE`, default ~/.cache/basehold); returns the
        folder holding them. Waits for the model as `attach` does (up to `wait` s)."""
        from service.worker.files_cache import fetch_files

        self.wait(model_id, timeout=wait, absent_ok=True)
        listing = self._call("GET", f"/v1/models/{model_id}/files")

        def download(name: str) -> bytes:
            return bytes(self._send("GET", f"/v1/models/{model_id}/files/{name}").content)

        return fetch_files(listing, download)

    def tokenizer(self, model_id: str, *, wait: float = 600.0) -> Any:
        """The checkpoint's tokenizer (`AutoTokenizer` over the fetched files)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.files(model_id, wait=wait)))

    def generation_config(self, model_id: str, *, wait: float = 600.0) -> Any:
        """The checkpoint's `generation_config.json` (or one derived from its config)."""
        from transformers import AutoConfig, GenerationConfig

        folder = self.files(model_id, wait=wait)
        if (folder / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(str(folder))
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder)))

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
