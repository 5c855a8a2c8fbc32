"""One Settings object (env prefix BASEHOLD_), built by the caller and passed down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.common import sizes
from service.serving.memory.admission import Budget

Scope = Literal["admin", "ensure", "worker", "read"]
# What the placeholder keys of docker/basehold.env.example and of
# deploy/examples/secret.example.yaml contain (in any case); refused in a key.
PLACEHOLDER_KEY_MARKS = ("change-me", "replace-")
GENERATE_KEY = 'python3 -c "import secrets; print(secrets.token_urlsafe(24))"'


def parse_size(value: str | int) -> int:
    """'8GiB', '512MB', '0' or bytes -> bytes (accelerate's grammar)."""
    return sizes.parse_size(value)


def _default_socket() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(runtime) / "basehold" if runtime else Path(f"/tmp/basehold-{os.getuid()}")
    return folder / "basehold.sock"


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "basehold" / "state"


class Settings(BaseSettings):
    """Every knob of the service. See docs/configuration.md."""

    # hide_input_in_errors: a validation error never prints a value (API keys are secrets).
    model_config = SettingsConfigDict(
        env_prefix="BASEHOLD_", extra="ignore", hide_input_in_errors=True
    )

    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="basehold's own files: the state database (held models and leases, "
        "restored after a restart), the one-instance lock, disk-offload folders, snapshots.",
    )
    restore: bool = Field(
        default=True,
        description="Restore the models and leases recorded in the state database at start. "
        "false: start empty (and forget what was recorded).",
    )
    snapshots: bool = Field(
        default=True,
        description="Keep a copy of each model held in host memory alone (its arena: "
        "quantized or cast as held) in the state directory's snapshots/ folder, so that a "
        "start holds it again without loading it (while its checkpoint's files are "
        "unchanged). Written in the background once ready, when it takes at most half the "
        "disk space left; removed with the model. false: every start loads every model again.",
    )
    keeper: bool = Field(
        default=False,
        description="Run `basehold serve` under a small keeper process (stdlib only) that "
        "holds duplicates of every held model's memory and of the listening sockets, and "
        "starts the serving process again if it dies: a crash loads nothing again.",
    )
    take_over: bool = Field(
        default=False,
        description="Start by taking the held models, leases and sockets of the basehold "
        "running on this state directory (`serve --take-over`); with none running, start "
        "as usual.",
    )
    after_handover: Literal["exit", "idle"] = Field(
        default="exit",
        description="What a basehold does once it handed over: `exit` (0), or `idle`: answer "
        "503 `handed_over` until stopped (a Kubernetes pod, whose container must not exit "
        "before the pod is deleted).",
    )
    handover_load_wait_seconds: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="How long a handover lets loads in progress finish first; the successor "
        "starts the ones still loading after it again.",
    )
    model_roots: list[Path] = Field(
        default_factory=list,
        description="Directories that local sources must live under. "
        "Default: a `models/` folder beside the state dir.",
    )
    max_concurrent_loads: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Loads running at once; more wait in order (restored pinned and leased "
        "models first). Default: one per 8 usable cores, 1 to 4.",
    )
    max_concurrent_estimates: int = Field(
        default=2,
        ge=1,
        le=64,
        description="POST /v1/estimate helper processes at once; as many more wait up to "
        "10 s, the rest are refused 429 too_many_requests.",
    )
    allow_remote_code: bool = Field(
        default=False, description="Allow `trust_remote_code: true` in load requests."
    )
    api_keys: dict[str, list[Scope]] = Field(
        default_factory=dict,
        description="Bearer key -> scopes. Empty: no auth (then bind 127.0.0.1 only).",
    )
    socket: Path = Field(
        default_factory=_default_socket,
        description="Unix socket workers get model arenas from (with a lease's secret). Its "
        "folder must be writable by this user only; share that folder with workers.",
    )
    max_leases_per_model: int = Field(
        default=64, ge=1, le=100_000, description="More leases on one model answer 429."
    )
    max_leases_per_holder: int = Field(
        default=16,
        ge=1,
        le=100_000,
        description="More leases held by one holder name (on all models) answer 429.",
    )
    max_leases_per_key: int = Field(
        default=16,
        ge=1,
        le=100_000,
        description="More leases on one model taken with one worker API key (whatever their "
        "holder names) answer 429. Admin keys, and a service without keys, are exempt.",
    )
    host_memory_budget: str | None = Field(
        default=None,
        description='Host bytes held models may use, e.g. "8GiB". Default: what is available '
        "minus the headroom.",
    )
    memory_headroom: str = Field(
        default="1GiB", description="Kept free on every device when admitting a load."
    )
    eviction: Literal["none", "lru-idle"] = Field(
        default="none",
        description="lru-idle: evict ready, unleased models, least recently used first, "
        "until a new load fits.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads torch may use in each loader (loading, casting, "
        "quantizing). Default: the usable cores (affinity, cgroup CPU quota) shared among "
        "the loads that may run at once.",
    )
    loader_template: str | None = Field(
        default=None,
        description="The socket of a running loader template (`python -m "
        "service.loader.forker --listen PATH`, same user) to fork loaders from, instead of "
        "starting one: several instances on a node can share one.",
    )
    loader_stall_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="A loader that sends nothing (no progress, no answer) for this long is "
        "killed and its load fails loader_stalled.",
    )
    preload: Path | None = Field(
        default=None,
        description="A YAML or JSON file of load requests ensured at start; /readyz waits "
        "for them. A bad entry is logged and skipped.",
    )
    loader_memory_limit: int | None = Field(
        default=None,
        description="Address space each loader may map beyond what its template had "
        "(bytes or e.g. '64GiB'; RLIMIT_AS): a load that needs more fails out_of_memory in "
        "its own process instead of waking the node's OOM killer. Default: no limit.",
    )
    lease_reap_seconds: float = Field(default=1.0, gt=0, le=60)
    memory_history_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="How often a memory sample is kept for GET /v1/memory/history (an hour "
        "of them, at most 3600 samples).",
    )
    segment_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="How long a GPU model's device memory outlives its last released lease "
        "when the model is unloaded (a slow worker may still read it).",
    )
    socket_group: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="A group name or gid: the socket folder becomes 0750 and the socket 0660 "
        "with it, so workers of other uids in that group (other containers, other PID "
        "namespaces) may connect; they still need a lease's secret.",
    )
    node_features_file: Path | None = Field(
        default=None,
        description="A Node Feature Discovery feature file (in NFD's features.d folder) "
        "rewritten on every change: basehold.ready=true and basehold-model.<id>=ready per "
        "ready shareable model; removed at shutdown.",
    )
    hf_endpoint: str | None = Field(
        default=None, description="Hub endpoint (a mirror); default: huggingface_hub's."
    )
    download_retries: int = Field(
        default=4,
        ge=0,
        le=20,
        description="Hub downloads that fail (a cut connection, 5xx) are retried this many "
        "times with exponential backoff, then the load fails `download_failed`.",
    )
    download_backoff_seconds: float = Field(
        default=2.0, ge=0, le=300, description="Wait before the first download retry (doubles)."
    )
    download_workers: int = Field(
        default=8, ge=1, le=64, description="Files of one hub snapshot downloaded in parallel."
    )
    allow_unauthenticated_remote: bool = Field(
        default=False,
        description="Serve on a non-loopback address with no API keys (not recommended).",
    )
    max_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=1 << 30,
        description="Larger request bodies answer 413 before they are read.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Without API keys, Host names accepted besides loopback ones (DNS "
        'rebinding guard), e.g. ["basehold.internal"].',
    )

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, value: dict[str, list[Scope]]) -> dict[str, list[Scope]]:
        # The messages never quote a key, not even part of one: they end up in logs.
        for number, (key, scopes) in enumerate(value.items(), start=1):
            if len(key) < 8:
                raise ValueError(f"API key number {number} is shorter than 8 characters")
            # The examples' keys are public: a copy left as is must not serve (the
            # container's entrypoint refuses them too, before starting this).
            mark = next((m for m in PLACEHOLDER_KEY_MARKS if m in key.lower()), None)
            if mark is not None:
                raise ValueError(
                    f'API key number {number} is a placeholder (it contains "{mark}"): '
                    f"generate each key with {GENERATE_KEY}"
                )
            if not scopes:
                raise ValueError(f"API key number {number} has no scopes")
        return value

    @model_validator(mode="after")
    def _default_roots(self) -> Settings:
        self.state_dir = self.state_dir.expanduser().resolve()
        if not self.model_roots:
            self.model_roots = [self.state_dir.parent / "models"]
        self.model_roots = [root.expanduser().resolve() for root in self.model_roots]
        return self

    @field_validator("loader_memory_limit", mode="before")
    @classmethod
    def _limit(cls, value: object) -> int | None:
        if value is None or value == "":
            return None
        size = parse_size(value if isinstance(value, int) else str(value))
        if size <= 0:
            raise ValueError("give a positive size, e.g. '64GiB'")
        return size

    @field_validator("host_memory_budget", "memory_headroom")
    @classmethod
    def _sizes(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @property
    def budget(self) -> Budget:
        budget = self.host_memory_budget
        return Budget(
            headroom_bytes=parse_size(self.memory_headroom),
            host_budget_bytes=parse_size(budget) if budget is not None else None,
        )

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def offload_dir(self) -> Path:
        return self.state_dir / "offload"

    def ensure_dirs(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.offload_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for root in self.model_roots:
            root.mkdir(parents=True, exist_ok=True)
