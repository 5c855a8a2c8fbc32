"""What the serving process knows of a held model: the loader's manifest, as facts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.common.handles.descriptor import Handle
from service.common.load.spec import Task


@dataclass(frozen=True)
class Placed:
    shareable: bool
    reason: str | None = None
    handle: Handle | None = None  # shareable models only


class Manifest(BaseModel):
    """A held model's facts as its loader reports them (`protocol.Ready`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: Task
    architecture: str
    dtype: str
    parameters: int = Field(ge=0)
    resolved_revision: str | None
    by_device: dict[str, int]
    device_map: dict[str, str]
    shareable: bool
    reason: str | None
    handle: Handle | None
    checkpoint: Path
    allowed: list[Path]

    @model_validator(mode="after")
    def _shareable_has_a_handle(self) -> Manifest:
        if self.shareable and self.handle is None:
            raise ValueError("a shareable model comes with its handle")
        return self


@dataclass
class Held:
    """A held model's facts; its memory is the fds in `HeldArenas` (or its runner)."""

    task: Task
    architecture: str
    dtype: str
    parameters: int
    resolved_revision: str | None
    by_device: dict[str, int]
    device_map: dict[str, str]
    placed: Placed
    checkpoint: Path  # the resolved folder (tokenizer and config files are served from it)
    allowed: tuple[Path, ...]  # where its files must resolve

    @property
    def segments(self) -> int:
        """Device segments (their fds come after the arena's)."""
        handle = self.placed.handle
        return len(handle.segments) if handle is not None else 0

    @property
    def needs_runner(self) -> bool:
        """Whether the loader stays alive holding the model: not shareable."""
        return not self.placed.shareable

    def served_by(self, socket: str, uid: int) -> Held:
        """The same facts with the worker socket and its uid of the serving process: what
        workers are told never comes from a loader."""
        handle = self.placed.handle
        if handle is None:
            return self
        arena = handle.arena.model_copy(update={"socket": socket})
        served = handle.model_copy(update={"arena": arena, "socket_uid": uid})
        return replace(self, placed=replace(self.placed, handle=served))

    def manifest(self) -> Manifest:
        return Manifest(
            task=self.task,
            architecture=self.architecture,
            dtype=self.dtype,
            parameters=self.parameters,
            resolved_revision=self.resolved_revision,
            by_device=self.by_device,
            device_map=self.device_map,
            shareable=self.placed.shareable,
            reason=self.placed.reason,
            handle=self.placed.handle,
            checkpoint=self.checkpoint,
            allowed=list(self.allowed),
        )

    @classmethod
    def from_manifest(cls, facts: Manifest) -> Held:
        return cls(
            task=facts.task,
            architecture=facts.architecture,
            dtype=facts.dtype,
            parameters=facts.parameters,
            resolved_revision=facts.resolved_revision,
            by_device=dict(facts.by_device),
            device_map=dict(facts.device_map),
            placed=Placed(shareable=facts.shareable, reason=facts.reason, handle=facts.handle),
            checkpoint=facts.checkpoint,
            allowed=tuple(facts.allowed),
        )
