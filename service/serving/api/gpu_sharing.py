"""Serving side of the bindings check: whether this node's cuda-bindings can drive its
NVIDIA driver (`service.common.handles.bindings`, torch-free). On a mismatch the loaders
hold GPU models privately; the serving process logs the package to install once and
`/readyz` shows it, while the service stays ready (CPU and private GPU loads still work)."""

from __future__ import annotations

import functools
import logging

from service.common.handles import bindings

log = logging.getLogger("basehold.gpu")


@functools.cache
def bindings_mismatch() -> str | None:
    """The sentence naming the cuda-bindings to install, or None; logged the first time
    (at start, then cached: NVML is asked once per process)."""
    problem = bindings.mismatch()
    if problem is not None:
        log.warning("GPU sharing is off: %s", problem)
    return problem
