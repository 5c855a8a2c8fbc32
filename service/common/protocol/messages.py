"""The loader protocol, typed and versioned: every message between the serving process,
the loader template (`service.loader.forker`) and a loader process.

Messages are JSON frames (`service.common.protocol.wire`); nothing is pickled. Every connection to
the template starts with `Hello` both ways, so a template of another PROTOCOL_VERSION (a
shared one started from other code) is refused before it is sent a job. A message that
does not validate raises `BadMessage` once the fds it brought are closed.

    serving process -> template   Hello, then Spawn (+ the loader's channel and stderr fds)
    template -> serving process   Hello, then Spawned, and Exited when the loader ends
                                  (Refused: a spawn it cannot do)
    loader -> serving process     Progressed..., Prepared (a hub load asks), Ready (+ fds)
                                  or Estimated; Failed on any error
    serving process -> loader     Go or Stop (the answer to Prepared; Stop ends a runner)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from service.common.estimates import Estimate
from service.common.load.progress import Phase
from service.common.protocol.held import Manifest
from service.common.protocol.job import Job
from service.common.protocol.wire import BadMessage

# 1 was the unversioned protocol of pickled jobs.
PROTOCOL_VERSION = 2
REPLY_SECONDS = 30.0  # the template answers a connection at once (it only forks)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- between the serving process and the template ---------------------------------------
class Hello(Message):
    """First on every connection to the template, both ways."""

    type: Literal["hello"] = "hello"
    protocol: int
    watch: bool = False  # the serving process's liveness watch: held open, nothing else


Kind = Literal["load", "prepare", "estimate"]


class Spawn(Message):
    """Fork a loader for `job`. Brings two fds: the loader's channel, and where it logs."""

    type: Literal["spawn"] = "spawn"
    kind: Kind
    job: Job


class Spawned(Message):
    type: Literal["spawned"] = "spawned"
    pid: int = Field(gt=0)


class Exited(Message):
    type: Literal["exited"] = "exited"
    status: int  # the exit code; negative: the signal that ended it


class Refused(Message):
    type: Literal["refused"] = "refused"
    reason: str


# -- between the serving process and a loader ---------------------------------------------
class Progressed(Message):
    type: Literal["progress"] = "progress"
    phase: Phase
    bytes_done: int = Field(ge=0)
    bytes_total: int = Field(ge=0)


class _Priced(Message):
    estimate: dict[str, Any]

    def value(self) -> Estimate:
        try:
            return Estimate.from_json(self.estimate)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadMessage(f"not an estimate ({type(exc).__name__}: {exc})") from None


class Prepared(_Priced):
    """A hub load fetched its metadata and asks before it reads any weight."""

    type: Literal["prepared"] = "prepared"


class Estimated(_Priced):
    type: Literal["estimate"] = "estimate"


class Ready(Message):
    """The manifest; brings the arena's fd, then one per device segment (shareable)."""

    type: Literal["ready"] = "ready"
    facts: Manifest


class Failed(Message):
    type: Literal["failed"] = "failed"
    code: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    message: str
    status: int = Field(ge=400, le=599)


class Go(Message):
    type: Literal["go"] = "go"


class Stop(Message):
    type: Literal["stop"] = "stop"


ToTemplate = Annotated[Hello | Spawn, Field(discriminator="type")]
FromTemplate = Annotated[Hello | Spawned | Exited | Refused, Field(discriminator="type")]
FromLoader = Annotated[
    Progressed | Prepared | Estimated | Ready | Failed, Field(discriminator="type")
]
ToLoader = Annotated[Go | Stop, Field(discriminator="type")]

TO_TEMPLATE: TypeAdapter[ToTemplate] = TypeAdapter(ToTemplate)
FROM_TEMPLATE: TypeAdapter[FromTemplate] = TypeAdapter(FromTemplate)
FROM_LOADER: TypeAdapter[FromLoader] = TypeAdapter(FromLoader)
TO_LOADER: TypeAdapter[ToLoader] = TypeAdapter(ToLoader)
