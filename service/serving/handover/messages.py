"""The handover protocol between a running basehold and its successor, typed and versioned.

JSON frames over a Unix stream socket (`service.common.protocol.wire`), fds by SCM_RIGHTS
with the frame that lists what each one is:

    successor -> running   Hello (its versions; its network namespace)
    running -> successor   Refused (incompatible, or busy: it keeps serving)
                           or Offer (+ fds: the HTTP listener when both share a network
                           namespace, the worker socket's listener, then each offered
                           model's arena and device segments, or its runner's channel,
                           status connection and template lifeline, in the order listed)
    successor -> running   Taken (it read them all)
    running -> successor   Released (it will not resume: the fds are the successor's; a
                           successor that hears nothing closes them and exits, as the
                           running one may have given up waiting and resumed)

Everything a successor takes has to be read the same way by both: the state database's
schema, the handle workers are sent, and the loader protocol. A successor that differs in
any of them is refused before anything stops."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from service import __version__
from service.common.handles.descriptor import Handle
from service.common.protocol.held import Held, Manifest
from service.common.protocol.keeper import network_namespace, pid_namespace
from service.common.protocol.messages import PROTOCOL_VERSION
from service.serving.registry.record import ModelRecord
from service.serving.state.database import SCHEMA_VERSION

HANDOVER_VERSION = 2  # 2: runners are handed over
HANDLE_VERSION: int = Handle.model_fields["version"].default
SOCKET_NAME = "handover.sock"  # in the state directory


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hello(_Message):
    type: Literal["hello"] = "hello"
    handover: int
    state_schema: int
    handle: int
    protocol: int
    version: str  # basehold's (informational)
    pid: int
    netns: str  # /proc/self/ns/net's link: the HTTP listener is passed only within one
    pidns: str  # /proc/self/ns/pid's link: runners are passed only within one
    gpus: list[str] = Field(default_factory=list)  # the UUIDs of the GPUs it sees (NVML)

    @classmethod
    def ours(cls, gpus: list[str] | None = None) -> Hello:
        return cls(
            gpus=gpus or [],
            handover=HANDOVER_VERSION,
            state_schema=SCHEMA_VERSION,
            handle=HANDLE_VERSION,
            protocol=PROTOCOL_VERSION,
            version=__version__,
            pid=os.getpid(),
            netns=network_namespace(),
            pidns=pid_namespace(),
        )

    def incompatible(self) -> str | None:
        """Why this successor cannot take over from this build (None: it can)."""
        ours = Hello.ours()
        for field, what in (
            ("handover", "handover protocol"),
            ("state_schema", "state database schema"),
            ("handle", "handle version"),
            ("protocol", "loader protocol"),
        ):
            theirs, mine = getattr(self, field), getattr(ours, field)
            if theirs != mine:
                return (
                    f"its {what} is {theirs}, this basehold's ({__version__}, pid "
                    f"{os.getpid()}) is {mine}"
                )
        return None


class Refused(_Message):
    type: Literal["refused"] = "refused"
    reason: str


class OfferedModel(_Message):
    id: str
    load_id: str
    facts: Manifest
    # The arena's, then one per device segment; or (a runner) its channel's, its status
    # connection's, then its template's lifeline (`Loaders.handover_fds`).
    fds: int = Field(ge=1)
    started_at: datetime | None
    ready_at: datetime | None
    runner: int | None = Field(default=None, ge=1)  # the pid of the runner holding it

    @classmethod
    def of(cls, record: ModelRecord, held: Held, fds: int, runner: int | None) -> OfferedModel:
        """A ready model's entry, with `fds` fds of its memory (or of its runner)."""
        return cls(
            id=record.id,
            load_id=record.load_id,
            facts=held.manifest(),
            fds=fds,
            started_at=record.started_at,
            ready_at=record.ready_at,
            runner=runner,
        )


class Offer(_Message):
    type: Literal["offer"] = "offer"
    pid: int
    http: bool  # the first fd is the HTTP listener
    worker: bool = True  # then the worker socket's listener (a keeper's first offer: none)
    models: list[OfferedModel]

    @property
    def fd_count(self) -> int:
        return int(self.http) + int(self.worker) + sum(m.fds for m in self.models)


class Taken(_Message):
    type: Literal["taken"] = "taken"


class Released(_Message):
    """The answer to Taken: the running one will not resume; the fds are the successor's."""

    type: Literal["released"] = "released"


ToSuccessor = TypeAdapter(Annotated[Refused | Offer, Field(discriminator="type")])
HelloMessage = TypeAdapter(Hello)
TakenMessage = TypeAdapter(Taken)
ReleasedMessage = TypeAdapter(Released)
