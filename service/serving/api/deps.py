"""Request dependencies: the app's services and bearer-key scopes."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.common.errors import Forbidden, Unauthorized
from service.serving.leases.lending import Lending
from service.serving.registry.registry import Registry
from service.serving.settings import Scope, Settings

_bearer = HTTPBearer(auto_error=False, description="API key from BASEHOLD_API_KEYS")
# admin, ensure and worker keys may also read. `ensure` is a training job's: load a model
# if it is not held, find it if it is; never unload, revoke, pin or run remote code.
IMPLIED: dict[str, set[str]] = {
    "admin": {"admin", "read"},
    "ensure": {"ensure", "read"},
    "worker": {"worker", "read"},
    "read": {"read"},
}


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


async def get_lending(request: Request) -> Lending:
    lending: Lending = request.app.state.lending
    return lending


# Hub tokens are passed to huggingface_hub and never stored, logged or echoed.
HubToken = Annotated[
    str | None, Header(alias="X-HF-Token", max_length=512, description="Hub token; never stored")
]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
LendingDep = Annotated[Lending, Depends(get_lending)]


def _scopes_of(settings: Settings, key: str) -> set[str] | None:
    for candidate, scopes in settings.api_keys.items():
        if hmac.compare_digest(candidate.encode(), key.encode()):
            return set().union(*(IMPLIED[s] for s in scopes))
    return None


async def caller_scopes(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> frozenset[str]:
    """The scopes of the request's key; every scope when no keys are configured."""
    if not settings.auth_enabled:
        return frozenset(IMPLIED) | frozenset({"anonymous"})
    if credentials is None:
        raise Unauthorized("Send `Authorization: Bearer <key>` with a key from the operator.")
    scopes = _scopes_of(settings, credentials.credentials)
    if scopes is None:
        raise Unauthorized("That API key is not valid. Check the key or ask the operator.")
    return frozenset(scopes)


ScopesDep = Annotated[frozenset[str], Depends(caller_scopes)]


async def caller_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """A fingerprint of the request's API key (never the key), to count what one key
    holds; None without one. Use it beside `require`, which checks the key."""
    if credentials is None:
        return None
    return hashlib.sha256(credentials.credentials.encode()).hexdigest()[:16]


KeyDep = Annotated[str | None, Depends(caller_key)]


def require(*scopes: Scope) -> Any:
    """The request's key must have one of `scopes`."""

    async def check(granted: ScopesDep) -> None:
        if not granted.intersection(scopes):
            needed = " or ".join(repr(s) for s in scopes)
            raise Forbidden(f"This key lacks the {needed} scope needed here. Use a key with it.")

    return Depends(check)


def is_admin(scopes: frozenset[str]) -> bool:
    """An admin *key* (with no keys configured nobody is admin: lease secrets still count)."""
    return "admin" in scopes and "anonymous" not in scopes
