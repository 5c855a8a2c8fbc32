"""The public import path of the worker client: `from service.client import Client`.
The code lives in `service.worker.client` (what training code imports); this module only
re-exports it, so scripts written against earlier releases keep working."""

from service.worker.client import (
    BaseholdError,
    Client,
    GpuNotFound,
    LeaseLost,
    LeaseState,
    ServiceUnreachable,
    default_holder,
    keep_base_out_of_ddp,
    lease_of,
)

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
