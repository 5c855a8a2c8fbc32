"""The serving process's side of its keeper (`service.keeper`, `serve --keeper`).

At start it says hello on the channel the keeper gave it and takes what the keeper
offers: nothing the first time; after a crash, the HTTP and worker listeners and every
model the crashed process held (adopted like a predecessor's). From then on it tells the
keeper each model that turns ready (`keep`, with new fds of its memory) and each that is
let go (`drop`), and once serving, its listeners."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import suppress

from service.common.protocol.keeper import FD_SETTING, RESTARTS_SETTING
from service.common.protocol.wire import Channel, ChannelClosed, close_fds
from service.serving.handover.giver import Fds
from service.serving.handover.messages import OfferedModel
from service.serving.handover.taker import Handed, ask
from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State

log = logging.getLogger("basehold.handover")

ANSWER_SECONDS = 30.0  # the keeper answers at once (it only dups fds)


def restarts() -> int:
    """How many times the keeper started this serving process again (0: none, or none)."""
    try:
        return int(os.environ.get(RESTARTS_SETTING, "0"))
    except ValueError:
        return 0


class KeeperLink:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.placement: Fds | None = None
        self._broken = False

    @classmethod
    def from_env(cls) -> KeeperLink | None:
        """The keeper's channel, where a keeper started this process."""
        value = os.environ.pop(FD_SETTING, None)
        if value is None:
            return None
        return cls(Channel(socket.socket(fileno=int(value))))

    def take(self, gpus: list[str]) -> Handed | None:
        """What the keeper offers (None: nothing, a first start)."""
        handed = ask(self.channel, ANSWER_SECONDS, gpus)
        if handed is not None and not (handed.http or handed.worker or handed.models):
            return None
        return handed

    def listeners(self, http: socket.socket | None, worker: int) -> None:
        """Give the keeper the listening sockets (it keeps them bound across a crash);
        `worker`: a new fd of the worker socket's listener, closed here."""
        fds = ([os.dup(http.fileno())] if http is not None else []) + [worker]
        try:
            self._send({"type": "listeners", "http": http is not None, "worker": True}, fds)
        finally:
            close_fds(fds)

    def handed_over(self) -> None:
        """This process handed everything to a successor (of another keeper, or of none):
        the keeper keeps nothing more, and does not start this one again."""
        self._send({"type": "handed_over"}, [])

    def on_transition(self, record: ModelRecord, previous: State, target: State) -> None:
        """A registry listener: a model turned ready (keep its memory) or was let go."""
        if target == previous:
            return
        if target == State.READY:
            self._keep(record)
        elif previous == State.READY:
            self._send({"type": "drop", "id": record.id}, [])

    def _keep(self, record: ModelRecord) -> None:
        held = record.loaded
        if held is None or self.placement is None:
            return
        try:
            fds, runner = self.placement.handover_fds(record.load_id)
        except Exception:
            return
        entry = OfferedModel.of(record, held, len(fds), runner)
        try:
            self._send({"type": "keep", "model": entry.model_dump(mode="json")}, fds)
        finally:
            close_fds(fds)

    def _send(self, message: dict[str, object], fds: list[int]) -> None:
        if self._broken:
            return
        try:
            self.channel.send(message, fds)
        except (ChannelClosed, OSError) as exc:
            self._broken = True
            log.error("the keeper is gone (%s): a crash of this process loses its models", exc)

    def close(self) -> None:
        with suppress(OSError):
            self.channel.close()
