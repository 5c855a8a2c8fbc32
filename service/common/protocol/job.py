"""What a loader process is asked to do: a typed message (`protocol.Spawn` carries it as
JSON to the template, which validates it before it forks)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from service.common.load.pin import HubPin
from service.common.load.sources import HubOptions
from service.common.load.spec import LoadRequest


class StandIn(BaseModel):
    """A stand-in for absent hardware that a test hands the service (a fake `CudaProbe` or
    `DeviceSegments`), rebuilt in the loader from its class and its JSON state."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # "module:Class"
    state: dict[str, JsonValue] = Field(default_factory=dict)

    @classmethod
    def of(cls, stand_in: object | None) -> StandIn | None:
        if stand_in is None:
            return None
        kind = type(stand_in)
        return cls(factory=f"{kind.__module__}:{kind.__qualname__}", state=vars(stand_in))

    def build(self) -> Any:
        module, _, name = self.factory.partition(":")
        kind: Any = importlib.import_module(module)
        for part in name.split("."):
            kind = getattr(kind, part)
        made = kind.__new__(kind)
        vars(made).update(self.state)
        return made


class Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str
    load_id: str
    spec: LoadRequest
    token: str | None = Field(repr=False)
    roots: list[Path]
    offload_root: Path
    hub: HubOptions
    # The service's worker socket, which the loader names in the handle it builds; the
    # serving process puts its own socket and uid in the handle whatever the loader says.
    socket: str
    cuda: StandIn | None = None  # None: torch's view, in the loader
    segments: StandIn | None = None  # None: CUDA
    admitted: bool = False  # else the loader asks before it reads any weight
    pin: HubPin | None = None  # admitted hub loads: the snapshot admission priced
    threads: int = Field(default=1, ge=1)  # torch threads in the loader
    memory_limit: int | None = Field(default=None, ge=0)  # address space it may add
    # The service's hub settings now (HF_*): the template's environment is from its start.
    hub_env: dict[str, str] = Field(default_factory=dict, repr=False)
    # May the loader fall back on the server's own hub token (HF_TOKEN, the token file)
    # when `token` is None? Not for a read-only estimate by a key without `admin`.
    server_token: bool = True
    # How long the loader waits for the service's answer to `prepared`.
    stall_seconds: float = Field(default=300.0, gt=0)


def hub_env(*, server_token: bool = True) -> dict[str, str]:
    """The service's HF_* settings for a loader; without `server_token`, not its token."""
    return {
        key: value
        for key, value in os.environ.items()
        if key.startswith("HF_") and (server_token or key != "HF_TOKEN")
    }
