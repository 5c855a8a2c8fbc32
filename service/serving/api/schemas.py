"""Response schemas of the HTTP contract (docs/api.md in the repository)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.common.handles.descriptor import Handle
from service.common.load.spec import LoadRequest
from service.serving.leases.leases import MAX_TTL_SECONDS, Lease
from service.serving.leases.lending import Grant
from service.serving.registry.record import ModelRecord


class ProgressOut(BaseModel):
    phase: str = Field(examples=["loading"])
    bytes_done: int
    bytes_total: int


class ErrorOut(BaseModel):
    code: str = Field(examples=["wrong_model_type"])
    message: str


class ModelMemory(BaseModel):
    footprint_bytes: int
    by_device: dict[str, int] = Field(examples=[{"cuda:0": 13476839424}])


class Timings(BaseModel):
    queued_at: datetime
    started_at: datetime | None = None
    ready_at: datetime | None = None
    load_seconds: float | None = None
    restored_at: datetime | None = Field(
        default=None, description="set when this record was restored after a restart"
    )


class ModelStatus(BaseModel):
    id: str = Field(examples=["llama2-7b"])
    name: str | None = None
    source: str
    resolved_revision: str | None = None
    spec: LoadRequest
    state: str = Field(
        examples=["ready"], description="queued|loading|ready|failed|unloading|cancelled"
    )
    progress: ProgressOut
    error: ErrorOut | None = None
    architecture: str | None = Field(default=None, examples=["LlamaForCausalLM"])
    task: str | None = None
    dtype: str | None = None
    quantization: dict[str, Any] | None = None
    parameters: int | None = None
    memory: ModelMemory
    device_map: dict[str, str] | None = None
    shareable: bool
    shareable_reason: str | None = None
    pinned: bool = Field(default=False, description="never evicted (the spec's `pinned`)")
    aliases: list[str] = Field(
        default_factory=list,
        description="Other names this model answers to: a POST of its load spec under another "
        "name finds it and adds the name here (one copy per spec). DELETE of an alias drops "
        "only the alias.",
    )
    leases: int
    timings: Timings

    @classmethod
    def of(cls, record: ModelRecord) -> ModelStatus:
        spec = record.spec
        progress = record.progress
        error = record.error
        loaded = record.loaded
        placed = loaded.placed if loaded is not None else None
        return cls(
            id=record.id,
            name=record.name,
            aliases=list(record.aliases),
            source=spec.source,
            resolved_revision=loaded.resolved_revision if loaded else None,
            spec=spec,
            state=record.state.value,
            progress=ProgressOut(
                phase=progress.phase.value,
                bytes_done=progress.bytes_done,
                bytes_total=progress.bytes_total,
            ),
            error=ErrorOut(code=error.code, message=error.message) if error else None,
            architecture=loaded.architecture if loaded else None,
            task=loaded.task.value if loaded else (spec.task.value if spec.task else None),
            dtype=loaded.dtype if loaded else None,
            quantization=spec.quantization.model_dump(mode="json") if spec.quantization else None,
            parameters=loaded.parameters if loaded else None,
            memory=ModelMemory(footprint_bytes=record.footprint_bytes, by_device=record.by_device),
            device_map=loaded.device_map if loaded else None,
            shareable=placed is not None and placed.shareable,
            shareable_reason=placed.reason if placed is not None else None,
            pinned=spec.pinned,
            leases=record.leases,
            timings=Timings(
                queued_at=record.queued_at,
                started_at=record.started_at,
                ready_at=record.ready_at,
                load_seconds=record.load_seconds,
                restored_at=record.restored_at,
            ),
        )


class ModelList(BaseModel):
    models: list[ModelStatus]


class DeviceOut(BaseModel):
    id: str = Field(examples=["cuda:0"])
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    torch_reserved_bytes: int
    torch_allocated_bytes: int
    held_bytes: int


class HostOut(BaseModel):
    total_bytes: int = Field(description="The node's RAM.")
    available_bytes: int = Field(
        description="The node's available memory (psutil). Admission also keeps loads "
        "under the container's limit: see container_limit_bytes."
    )
    process_rss_bytes: int
    shared_arena_bytes: int
    held_bytes: int
    container_limit_bytes: int | None = Field(
        None,
        description="The tightest cgroup memory limit over the service's cgroup and its "
        "ancestors (v2 memory.max, v1 memory.limit_in_bytes); null where none applies.",
    )
    container_usage_bytes: int | None = Field(
        None, description="That cgroup's working set (usage less inactive file cache)."
    )
    container_cgroup: str | None = Field(None, description="That cgroup's path.")


class ModelBytes(BaseModel):
    id: str
    by_device: dict[str, int]


class MemoryReport(BaseModel):
    devices: list[DeviceOut]
    host: HostOut
    models: list[ModelBytes]


class Problem(BaseModel):
    """application/problem+json (RFC 9457) with a stable machine `code`."""

    type: str = Field(examples=["https://basehold.dev/problems/model_leased"])
    title: str
    status: int
    detail: str
    code: str = Field(examples=["model_leased"])
    reason: str | None = Field(
        default=None,
        description="`lease_not_found` only: why the lease ended (`unloaded`, `revoked`, "
        "`expired`, `released`), null when the service does not know it",
    )


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    holder: str = Field(
        min_length=1,
        max_length=128,
        examples=["trainer-7"],
        description="who holds the lease (printable text, no control characters)",
    )
    ttl_seconds: int = Field(
        default=60, ge=1, le=MAX_TTL_SECONDS, description="renew before it runs out"
    )

    @field_validator("holder")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("holder must be printable text without control characters")
        return value


class LeaseOut(BaseModel):
    lease_id: str
    model_id: str
    holder: str
    ttl_seconds: int
    expires_at: datetime

    @classmethod
    def of(cls, lease: Lease) -> LeaseOut:
        return cls(
            lease_id=lease.id,
            model_id=lease.model_id,
            holder=lease.holder,
            ttl_seconds=lease.ttl_seconds,
            expires_at=lease.expires_at,
        )


class LeaseGrant(LeaseOut):
    """A new lease: the only answer that carries its secret."""

    secret: str = Field(
        description="shown once: renew, release and the arena socket need it (X-Lease-Secret)"
    )
    handle: Handle = Field(description="JSON descriptor for service.worker.client")

    @classmethod
    def of_grant(cls, grant: Grant) -> LeaseGrant:
        return cls(
            **LeaseOut.of(grant.lease).model_dump(), secret=grant.secret, handle=grant.handle
        )


class LeaseList(BaseModel):
    leases: list[LeaseOut]


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the problem+json errors a route can answer."""
    return {s: {"model": Problem, "content": {"application/problem+json": {}}} for s in statuses}


class EstimateOut(BaseModel):
    total_bytes: int
    by_device: dict[str, int] = Field(examples=[{"cuda:0": 4_000_000_000}])
    largest_layer_bytes: int
    fits: bool
    free_bytes: dict[str, int] = Field(
        description="free per device after headroom and what queued/loading models will take"
    )
    download_bytes: int = Field(
        default=0,
        description="what a hub source downloads into the HF cache first (0: local or cached)",
    )


class FileOut(BaseModel):
    name: str = Field(examples=["tokenizer.json"])
    size: int
    sha256: str


class FileList(BaseModel):
    model_id: str
    revision: str | None = Field(default=None, description="hub commit, null for local")
    files: list[FileOut]


class HostSampleOut(BaseModel):
    used_bytes: int = Field(description="The node's memory in use (total less available).")
    total_bytes: int
    held_bytes: int = Field(description="Held by models in host memory.")
    arena_bytes: int = Field(description="In shared arenas: lendable to workers.")
    leased_bytes: int = Field(description="Held by models with an active lease.")
    container_limit_bytes: int | None = None
    container_usage_bytes: int | None = None


class DeviceSampleOut(BaseModel):
    id: str = Field(examples=["cuda:0"])
    used_bytes: int = Field(description="NVML: every process on the GPU.")
    held_bytes: int
    leased_bytes: int
    total_bytes: int


class MemorySampleOut(BaseModel):
    at: datetime
    host: HostSampleOut
    devices: list[DeviceSampleOut]


class MemoryHistoryOut(BaseModel):
    interval_seconds: float = Field(description="How often a sample is taken.")
    span_seconds: float = Field(description="How far back samples are kept.")
    samples: list[MemorySampleOut] = Field(description="Oldest first.")
