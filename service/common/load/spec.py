"""The load specification: fixed vocabularies and the request model shared by HTTP and domain."""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator


class Task(str, Enum):
    CAUSAL_LM = "causal-lm"
    SEQ_CLS = "seq-cls"
    TOKEN_CLS = "token-cls"
    SEQ2SEQ_LM = "seq2seq-lm"
    BASE = "base"


class DType(str, Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class ComputeDType(str, Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class QuantMethod(str, Enum):
    BNB_4BIT = "bnb-4bit"
    BNB_8BIT = "bnb-8bit"


class QuantType(str, Enum):
    NF4 = "nf4"
    FP4 = "fp4"


class AttnImplementation(str, Enum):
    EAGER = "eager"
    SDPA = "sdpa"
    FLASH_ATTENTION_2 = "flash_attention_2"


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential", "cpu")
# ASCII digits only: str.isdigit() and \d also accept other scripts' digits.
CUDA_DEVICE = re.compile(r"^cuda:([0-9]{1,4})$")
CUDA_INDEX = re.compile(r"^[0-9]{1,4}$")
# A GPU by its UUID, as NVML and `nvidia-smi -L` print it: GPU-<uuid>, MIG-<uuid>, or the
# older MIG-GPU-<uuid>/<gi>/<ci>. Its index differs between processes (CUDA_VISIBLE_DEVICES);
# its UUID does not, so a worker can name the GPU the scheduler gave it.
_UUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
GPU_UUID = re.compile(rf"^(?:GPU-{_UUID}|MIG-{_UUID}|MIG-GPU-{_UUID}/[0-9]{{1,3}}/[0-9]{{1,3}})$")
CUDA_UUID = re.compile(rf"^cuda:({GPU_UUID.pattern[1:-1]})$")
# What the basehold Client (worker side) replaces with `cuda:<UUID>` of the GPU its process
# sees; the service cannot know which GPU that is, so it refuses the word itself.
THIS_GPU = "this-gpu"
ModelName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
# Every list and dict in a request is bounded, and so is every string in them: a request
# costs at most a few hundred KB of parsing however it is built.
ModulePath = Annotated[str, StringConstraints(min_length=0, max_length=512)]
DeviceName = Annotated[str, StringConstraints(max_length=64)]  # cuda:MIG-GPU-<uuid>/7/0
DeviceIndex = Annotated[int, Field(ge=0, le=1023)]
MAX_DEVICE_MAP_ENTRIES = 4096
DeviceMap = (
    Annotated[str, StringConstraints(max_length=64)]
    | Annotated[
        dict[ModulePath, DeviceName | DeviceIndex], Field(max_length=MAX_DEVICE_MAP_ENTRIES)
    ]
)
MemoryKey = Annotated[str, StringConstraints(max_length=64)]
MemorySize = Annotated[str, StringConstraints(max_length=32)] | Annotated[int, Field(ge=0)]


class Quantization(BaseModel):
    """bitsandbytes quantization. Fields that do not apply to `method` are refused."""

    model_config = ConfigDict(extra="forbid")

    method: QuantMethod
    quant_type: QuantType | None = Field(default=None, description="4-bit only; default nf4")
    compute_dtype: ComputeDType | None = Field(
        default=None, description="4-bit only; default: `dtype`, else bfloat16 on CUDA, float32"
    )
    double_quant: bool | None = Field(default=None, description="4-bit only; default false")
    skip_modules: list[ModulePath] | None = Field(
        default=None,
        max_length=1024,
        description="modules kept in full precision, e.g. ['lm_head']",
    )
    int8_threshold: float | None = Field(
        default=None, ge=0, description="8-bit only (LLM.int8 outlier threshold); default 6.0"
    )

    @field_validator("skip_modules")
    @classmethod
    def _skip_modules_are_patterns(cls, value: list[str] | None) -> list[str] | None:
        """transformers matches each entry as a regular expression (should_convert_module):
        one that does not compile would fail the load inside the loader."""
        for entry in value or []:
            try:
                re.compile(entry)
            except re.error as exc:
                raise ValueError(
                    f"skip_modules entry {entry!r} is not a valid pattern ({exc}): each is "
                    "matched as a regular expression against module names; escape special "
                    "characters (e.g. 'lm_head', 'model\\.layers\\.0\\.mlp')"
                ) from None
        return value


class BaseModelRef(BaseModel):
    """The hub model a local checkpoint is a copy of: what adapters trained on it name as
    their base (`base_model_name_or_path`, `revision`)."""

    model_config = ConfigDict(extra="forbid")

    hub_id: str = Field(
        min_length=1,
        max_length=96,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$",
        examples=["meta-llama/Llama-3.2-1B"],
    )
    revision: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^[A-Za-z0-9._/-]+$",
        description="the commit (or tag) of that repo the checkpoint is",
    )


class LoadRequest(BaseModel):
    """What to load and how. Identical normalized requests share one held model."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "source": "meta-llama/Llama-2-7b-hf",
                    "name": "llama2-7b",
                    "task": "causal-lm",
                    "dtype": "bfloat16",
                    "quantization": {
                        "method": "bnb-4bit",
                        "quant_type": "nf4",
                        "compute_dtype": "bfloat16",
                        "double_quant": True,
                    },
                    "device_map": "auto",
                }
            ]
        },
    )

    source: str = Field(
        min_length=1,
        max_length=4096,
        description="Hub repo id, or an absolute local directory under an allowed root",
    )
    name: ModelName | None = Field(default=None, description="Optional unique alias")
    revision: str | None = Field(
        default=None, max_length=256, description="Hub only: branch, tag or commit"
    )
    task: Task | None = Field(default=None, description="null: inferred from the config")
    dtype: DType = DType.AUTO
    quantization: Quantization | None = None
    device_map: DeviceMap = Field(
        default="auto",
        description="auto | balanced | balanced_low_0 | sequential | cpu | cuda:N | "
        "cuda:GPU-<uuid> (as `nvidia-smi -L` prints it) | "
        '{"module.path": "cuda:0" | "cuda:GPU-<uuid>" | "cpu" | "disk"}',
    )
    max_memory: dict[MemoryKey, MemorySize] | None = Field(
        default=None,
        max_length=64,
        description='accelerate syntax, e.g. {"0": "20GiB", "cpu": "64GiB"}; a GPU '
        "may be named by its UUID (cuda:GPU-<uuid>)",
    )
    offload: bool = Field(default=False, description="Allow disk offload (server-managed)")
    num_labels: int | None = Field(default=None, ge=1, le=100_000)
    attn_implementation: AttnImplementation | None = None
    trust_remote_code: bool = False
    base_model: BaseModelRef | None = Field(
        default=None,
        description="Local sources only: the hub model this checkpoint is a copy of, named "
        "as the base of adapters trained on it (default: the checkpoint's directory)",
    )
    pinned: bool = Field(
        default=False,
        description="Never evicted to make room for another load. Not part of the model's "
        "identity: a POST of a held spec with pinned true pins it.",
    )

    def canonical(self) -> dict[str, Any]:
        """The JSON form used for identity: everything but the alias and the pin (and
        `base_model` only when given, so that specs recorded before it existed keep their
        identity)."""
        canonical = self.model_dump(mode="json", exclude={"name", "pinned"})
        if canonical["base_model"] is None:
            del canonical["base_model"]
        return canonical
