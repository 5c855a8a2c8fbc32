"""The successor's side of a handover: ask the running basehold for what it holds.

`take_over` connects to the state directory's handover socket, checks that the process
there runs as this uid, says which versions this build reads, and returns what it was
handed (sockets and each model's fds, owned by this process from then on), or None when
nobody answers there (nothing to take over: start as usual). A refusal raises
`HandoverRefused` with the running instance's reason; it keeps serving."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.common.protocol.wire import (
    BadMessage,
    Channel,
    ChannelClosed,
    ChannelTimeout,
    close_fds,
)
from service.common.socket_protocol import peer_credentials
from service.serving.handover.messages import (
    Hello,
    Offer,
    OfferedModel,
    Refused,
    ReleasedMessage,
    Taken,
    ToSuccessor,
)

log = logging.getLogger("basehold.handover")

RELEASED_SECONDS = 10.0  # the running one answers Taken at once


class HandoverRefused(RuntimeError):
    """The running basehold would not hand over; the message says why and what to do."""


@dataclass
class TakenModel:
    offered: OfferedModel
    fds: list[int]


@dataclass
class Handed:
    """What a successor was handed; it owns every fd (`close` gives them up)."""

    pid: int  # the predecessor's (or the keeper's)
    http: socket.socket | None
    worker: socket.socket | None
    models: dict[str, TakenModel] = field(default_factory=dict)
    received: float = field(default_factory=time.monotonic)  # when the offer was read

    def close(self) -> None:
        for sock in (self.http, self.worker):
            if sock is not None:
                sock.close()
        for model in self.models.values():
            close_fds(model.fds)
        self.models.clear()


def take_over(path: Path, timeout: float, gpus: list[str] | None = None) -> Handed | None:
    """Take what the basehold serving on `path` holds (None: no basehold answers there,
    or it went away before it answered: start as usual, once its lock is free). `timeout`:
    how long it may take to hand over (it first lets its loads in progress finish).
    `gpus`: the UUIDs of the GPUs this process sees; a model on another GPU is not handed
    over (it is loaded again here)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    channel = Channel(sock)
    try:
        _, uid, _ = peer_credentials(sock)
        if uid != os.getuid():
            raise HandoverRefused(
                f"{path} is served by uid {uid}, not this user ({os.getuid()}): refusing to "
                "take anything from it. Check who owns the state directory."
            )
        return ask(channel, timeout, gpus)
    finally:
        with contextlib.suppress(OSError):
            channel.close()


def ask(channel: Channel, timeout: float, gpus: list[str] | None) -> Handed | None:
    """Say hello on `channel` and take what is offered (the channel stays open)."""
    try:
        channel.send(Hello.ours(gpus))
        answer, fds = channel.receive(ToSuccessor, timeout)
    except ChannelClosed:
        log.warning("the running basehold went away before it answered: starting as usual")
        return None
    except ChannelTimeout:
        raise HandoverRefused(
            f"the running basehold did not hand over within {timeout:.0f} s (it lets its "
            "loads in progress finish first: BASEHOLD_HANDOVER_LOAD_WAIT_SECONDS). It "
            "keeps serving; try again once its loads are done."
        ) from None
    except BadMessage as exc:
        raise HandoverRefused(
            f"the running basehold answered something this one cannot read ({exc}); it "
            "keeps serving. Run the same basehold version as it."
        ) from None
    if isinstance(answer, Refused):
        close_fds(fds)
        raise HandoverRefused(f"the running basehold refused the handover: {answer.reason}")
    handed = _unpack(answer, fds)
    try:
        channel.send(Taken())
        channel.receive(ReleasedMessage, RELEASED_SECONDS)
    except (ChannelClosed, ChannelTimeout, BadMessage, OSError) as exc:
        handed.close()  # it may have given up waiting and serves on: never two owners
        raise HandoverRefused(
            f"the running basehold (pid {answer.pid}) did not confirm the handover ({exc}): "
            "it may serve on, or have died; nothing was taken. Start this one again."
        ) from None
    return handed


def _unpack(offer: Offer, fds: list[int]) -> Handed:
    ids = [model.id for model in offer.models]
    loads = [model.load_id for model in offer.models]
    wrong = None
    if len(fds) != offer.fd_count:
        wrong = f"{len(fds)} fds for an offer of {offer.fd_count}"
    elif len(set(ids)) != len(ids) or len(set(loads)) != len(loads):
        wrong = "a model twice"
    rest = list(fds)
    http = worker = None
    try:
        if wrong is None and offer.http:
            http = _listener(rest.pop(0))
        if wrong is None and offer.worker:
            worker = _listener(rest.pop(0))
    except OSError as exc:
        wrong = f"a listener that is not a socket ({exc})"
    if wrong is not None:
        for sock in (http, worker):
            if sock is not None:
                sock.close()
        close_fds(rest)
        raise HandoverRefused(
            f"the running basehold sent {wrong}; nothing was taken. Start this one again; "
            "see both logs."
        )
    handed = Handed(pid=offer.pid, http=http, worker=worker)
    for model in offer.models:
        handed.models[model.id] = TakenModel(model, rest[: model.fds])
        del rest[: model.fds]
    return handed


def _listener(fd: int) -> socket.socket:
    try:
        return socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise
