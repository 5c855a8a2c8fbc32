"""The handle: a JSON descriptor of a held model's arena. No pickle ever crosses the wire."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Provenance(BaseModel):
    """What a saved adapter should name as its base: the hub id and commit for hub loads
    (never a cache path); for local loads the hub model the request says the checkpoint
    is a copy of, else the checkpoint's directory (as a plain `from_pretrained` of it
    would name it, so `AutoPeftModel*.from_pretrained(adapter)` resolves it there)."""

    source: str = Field(description="the load request's source (hub id or local path)")
    hub_id: str | None = Field(default=None, examples=["meta-llama/Llama-3.2-1B"])
    revision: str | None = Field(default=None, description="the hub commit sha")

    @property
    def base_name(self) -> str:
        """`name_or_path` of the attached model: the hub id, else the local directory."""
        return self.hub_id or self.source


class ArenaEntry(BaseModel):
    name: str
    dtype: str = Field(description="safetensors dtype code, e.g. F32, BF16, U8")
    shape: list[int]
    offset: int = Field(description="byte offset from the start of the data section")
    nbytes: int
    segment: str | None = Field(
        default=None,
        description="None: in the arena file; otherwise the name of a device segment",
    )


class Quant4State(BaseModel):
    """The non-tensor fields of a bitsandbytes QuantState; tensors are arena entries."""

    absmax: str
    code: str
    shape: list[int]
    dtype: str
    blocksize: int
    quant_type: str
    offset: str | None = None
    nested_absmax: str | None = None
    nested_code: str | None = None
    nested_blocksize: int | None = None
    nested_dtype: str | None = None


class Quant4Module(BaseModel):
    module: str
    in_features: int
    out_features: int
    bias: bool
    compute_dtype: str | None
    quant_storage: str
    compress_statistics: bool
    state: Quant4State


class ArenaInfo(BaseModel):
    """The sealed memfd holding the model's host tensors. A worker gets its fd from the
    service's Unix socket by presenting its lease id and secret (`service.worker.client` does)."""

    socket: str = Field(description="the service's Unix socket (BASEHOLD_SOCKET)")
    name: str = Field(description="the memfd's name, as /proc/<pid>/maps shows it")
    size: int
    data_start: int


class DeviceSegment(BaseModel):
    """One device allocation holding every tensor of the model on that device, lent as a
    file descriptor (a CUDA VMM allocation exported as a POSIX fd): the worker socket
    sends it after the arena's."""

    name: str = Field(description="what ArenaEntry.segment refers to, e.g. cuda:0")
    device: str = Field(description="the device in the service's numbering")
    device_uuid: str = Field(description="GPU UUID: the worker finds its own index by it")
    size: int = Field(description="bytes of the allocation (what the worker maps)")
    fd_index: int = Field(
        ge=1, description="position of its fd among those the worker socket sends (arena: 0)"
    )


class Handle(BaseModel):
    version: int = 5
    model_id: str
    arena: ArenaInfo
    socket_uid: int = Field(
        description="the uid that serves `arena.socket`: the client checks the socket's peer "
        "(SO_PEERCRED) against it before it sends the lease's secret"
    )
    segments: list[DeviceSegment] = Field(
        default_factory=list, description="device allocations (CUDA), lent as fds"
    )
    entries: list[ArenaEntry]
    parameters: dict[str, str] = Field(description="parameter name -> arena entry")
    buffers: dict[str, str] = Field(description="buffer name -> arena entry")
    quant4: list[Quant4Module] = Field(default_factory=list)
    config: dict[str, Any]
    architecture: str = Field(description="transformers model class, e.g. LlamaForCausalLM")
    dtype: str
    provenance: Provenance
    torch_version: str = Field(description="the loader's torch (informational)")
    ipc_format: str | None = Field(
        default=None, description="what the segments' fds are; null without segments"
    )
    generation_config: dict[str, Any] | None = Field(
        default=None, description="the checkpoint's generation config (models that generate)"
    )
