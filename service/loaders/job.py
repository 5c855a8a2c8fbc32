"""What a loader process is asked to do (pickled once, into the fresh process)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.loading.sources import HubOptions
from service.loading.spec import LoadRequest
from service.memory.cuda import CudaProbe


@dataclass(frozen=True)
class Job:
    model_id: str
    load_id: str
    spec: LoadRequest
    token: str | None
    roots: list[Path]
    offload_root: Path
    hub: HubOptions
    socket: str  # the service's worker socket, named in the handle
    cuda: CudaProbe | None  # None: torch's view, in the loader
    segments: Any = None  # a DeviceSegments stand-in (tests); None: CUDA
    admitted: bool = False  # else the loader asks before it reads any weight
    threads: int = 1  # torch threads in the loader
    memory_limit: int | None = None  # address space it may add (RLIMIT_AS), None: no limit
    # The service's hub settings now (HF_*): the template's environment is from its start.
    hub_env: dict[str, str] = field(default_factory=dict)


def hub_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key.startswith("HF_")}
