"""The handle: a JSON descriptor of a held model's arena. No pickle ever crosses the wire."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ArenaEntry(BaseModel):
    name: str
    dtype: str = Field(description="safetensors dtype code, e.g. F32, BF16, U8")
    shape: list[int]
    offset: int = Field(description="byte offset from the start of the data section")
    nbytes: int


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
    path: str
    size: int
    data_start: int


class Handle(BaseModel):
    version: int = 1
    model_id: str
    arena: ArenaInfo
    entries: list[ArenaEntry]
    parameters: dict[str, str] = Field(description="parameter name -> arena entry")
    buffers: dict[str, str] = Field(description="buffer name -> arena entry")
    quant4: list[Quant4Module] = Field(default_factory=list)
    config: dict[str, Any]
    architecture: str = Field(description="transformers model class, e.g. LlamaForCausalLM")
    dtype: str
