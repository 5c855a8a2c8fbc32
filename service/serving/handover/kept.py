"""The serving process's side of its keeper (`service.keeper`, `serve --keeper`).

At start it says hello on the channel the keeper gave it and takes what the keeper
offers: nothing the first time; after a crash, the HTTP and worker listeners and every
model the crashed process held (adopted like a predecessor's). From then on it tells the
keeper each model that turns ready (`keep`, with new fds of its memory) and each that is
let go (`drop`), and once serving, its listeners.

Those messages are sent in order by a thread of their own: a registry listener runs under
the registry's lock, and a keeper that stopped reading (stopped, stuck) must not stop the
registry with it. What it has not read is bounded (`PENDING` messages, their fds with
them); past that the link counts as lost, as a keeper that went away does."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from contextlib import suppress
from dataclasses import dataclass, field

from service.common.protocol.keeper import FD_SETTING, RESTARTS_SETTING
from service.common.protocol.wire import Channel, ChannelClosed, close_fds
from service.serving.handover.giver import Fds
from service.serving.handover.messages import OfferedModel
from service.serving.handover.taker import Handed, ask
from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State

log = logging.getLogger("basehold.handover")

ANSWER_SECONDS = 30.0  # the keeper answers at once (it only dups fds)
PENDING = 1024  # messages the keeper has not read yet, at most


@dataclass
class _Out:
    """A message for the keeper, with fds of its own (closed once sent)."""

    message: dict[str, object]
    fds: list[int]
    sent: threading.Event = field(default_factory=threading.Event)


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
        self._pending: queue.Queue[_Out | None] = queue.Queue(PENDING)
        self._sender = threading.Thread(target=self._send_in_order, name="keeper", daemon=True)
        self._sender.start()

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
        the keeper keeps nothing more, and does not start this one again. Returns once it
        is sent (after everything before it), or after ANSWER_SECONDS."""
        sent = self._send({"type": "handed_over"}, [])
        if sent is not None:
            sent.wait(ANSWER_SECONDS)

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

    def _send(self, message: dict[str, object], fds: list[int]) -> threading.Event | None:
        """Queue `message` with new fds of `fds` (the caller keeps its own); the event is
        set once it is sent (None: the link is lost, nothing is sent)."""
        if self._broken:
            return None
        out = _Out(message, [])
        try:
            out.fds.extend(os.dup(fd) for fd in fds)
        except OSError as exc:  # out of fds: this message only is not sent
            close_fds(out.fds)
            log.error("not telling the keeper %s (%s)", message.get("type"), exc)
            return None
        try:
            self._pending.put_nowait(out)
        except queue.Full:
            close_fds(out.fds)
            self._lost(f"it has not read the last {PENDING} messages")
            with suppress(OSError):  # a send blocked on it returns: what is queued is let go
                self.channel.sock.shutdown(socket.SHUT_RDWR)
            return None
        return out.sent

    def _send_in_order(self) -> None:
        while (out := self._pending.get()) is not None:
            try:
                if not self._broken:
                    self.channel.send(out.message, out.fds)
            except (ChannelClosed, OSError) as exc:
                self._lost(str(exc))
            finally:
                close_fds(out.fds)
                out.sent.set()

    def _lost(self, why: str) -> None:
        if not self._broken:
            self._broken = True
            log.error("the keeper is gone (%s): a crash of this process loses its models", why)

    def close(self) -> None:
        """Stop sending (what is not sent yet is dropped) and close the channel."""
        self._broken = True
        with suppress(queue.Full):
            self._pending.put_nowait(None)
        with suppress(OSError):
            self.channel.close()
        self._sender.join(1.0)
