"""The running basehold's side of a handover: it listens on the state directory's handover
socket and gives a successor what it holds.

On a Hello from a process of this uid with the same versions:
1. changes are refused (503 `handing_over`) and the ones in flight answered; loads in
   progress may finish, for up to `load_wait` seconds;
2. what is queued is written, and the state database frozen: what it says is what the
   successor takes;
3. the Offer goes out with dups of the HTTP listener (same network namespace only), the
   worker socket's listener and each ready model's arena and segment fds, or its runner's
   channel and status connection (the runner, and the template it was forked from, live
   on for the successor);
4. on Taken (the successor owns them), this instance lets go of everything: loads still in
   progress end (the successor restarts them from the state database), its own fds close,
   the lock is released last (the successor waits for it).

Anything that fails before Taken (the successor dies, sends nothing, refuses) undoes steps
1-2: the database thaws, each record is written again, changes are accepted again, and
this instance keeps serving as before. After Taken nothing is undone; a successor that
dies after it leaves the state database as it was frozen, which a plain restart restores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service.common.protocol.held import Held
from service.common.protocol.keeper import network_namespace, pid_namespace
from service.common.protocol.wire import BadMessage, Channel, ChannelClosed, ChannelTimeout
from service.common.protocol.wire import close_fds as close_all
from service.common.socket_protocol import peer_credentials
from service.serving.api.write_gate import WriteGate
from service.serving.handover.messages import (
    Hello,
    HelloMessage,
    Offer,
    OfferedModel,
    Refused,
    Released,
    TakenMessage,
)
from service.serving.memory.nvml import same_gpu
from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State
from service.serving.state.database import StateDB
from service.serving.state.lock import StateLock

log = logging.getLogger("basehold.handover")

HELLO_SECONDS = 5.0  # a successor says hello as soon as it connects
TAKEN_SECONDS = 30.0  # and answers an offer as soon as it has read it


class Holdings(Protocol):
    """What a handover reads and ends of the registry."""

    def records(self) -> list[ModelRecord]: ...

    def let_go(self) -> None: ...

    def silence(self) -> None: ...

    def shutdown(self) -> None: ...


class Fds(Protocol):
    def handover_fds(self, load_id: str) -> tuple[list[int], int | None]: ...

    def handed(self, load_ids: list[str]) -> None: ...


class WorkerSocket(Protocol):
    def dup_listener(self) -> int: ...

    def stop(self, *, unlink: bool = True) -> None: ...


@dataclass
class Parts:
    gate: WriteGate
    registry: Holdings
    placement: Fds
    flush: Callable[[], None]
    # A handover that did not happen: write the state as it is now (models and leases).
    resync: Callable[[], None]
    worker_socket: WorkerSocket
    lock: StateLock
    http: socket.socket | None  # the listener uvicorn serves (None: an app in a test)
    load_wait: float
    # Once handed over: stop serving (`http_passed`: the successor accepts on the listener).
    after: Callable[[bool], None]


class Giver:
    def __init__(self, path: Path, parts: Parts) -> None:
        self.path = path
        self.parts = parts
        self.db: StateDB | None = None  # set once the state is open
        self.handed_to: int | None = None
        self._let_go = False
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # -- the socket ----------------------------------------------------------------------
    def listen(self) -> None:
        """Bind the handover socket (a socket file there is a dead instance's, or a
        predecessor's that handed over to this one): a successor that connects from now on
        waits in its backlog until `start`."""
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))  # in the state directory: this user's alone (0700)
        os.chmod(self.path, 0o600)
        listener.listen(4)
        self._listener = listener

    def start(self) -> None:
        """Answer successors on what `listen` bound, in a thread of its own."""
        self._thread = threading.Thread(target=self._serve, name="handover", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        if self.handed_to is None:  # else the successor's socket file is there now
            self.path.unlink(missing_ok=True)
        if self._thread is not None and self._thread is not threading.current_thread():
            # A handover under way (a SIGTERM meanwhile) ends first, either way: the
            # shutdown then knows whether it still holds anything.
            self._thread.join(timeout=self.parts.load_wait + TAKEN_SECONDS + 35)

    def _serve(self) -> None:
        while self._listener is not None and self.handed_to is None:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # stopped
            channel = Channel(conn)
            try:
                self._answer(channel)
            except Exception:
                log.exception("handover: failed; still serving")
            finally:
                channel.close()

    def _answer(self, channel: Channel) -> None:
        pid, uid, _ = peer_credentials(channel.sock)
        if uid != os.getuid():
            log.warning("handover: refused a connection of uid %d (pid %d)", uid, pid)
            return
        try:
            hello, fds = channel.receive(HelloMessage, HELLO_SECONDS)
        except (ChannelClosed, ChannelTimeout, BadMessage) as exc:
            log.warning("handover: a connection sent no hello (%s); ignored", exc)
            return
        close_all(fds)
        reason = hello.incompatible()
        if reason is not None:
            log.warning("handover: refused pid %d: %s; still serving", hello.pid, reason)
            channel.send(
                Refused(
                    reason=f"{reason}. Run the same basehold version as the running one to "
                    "take over, or stop it first (its models are then restored from the "
                    "state database)."
                )
            )
            return
        self.give(channel, hello)

    # -- the handover ----------------------------------------------------------------------
    def give(self, channel: Channel, hello: Hello) -> None:
        parts = self.parts
        started = time.monotonic()
        log.info("handover: pid %d (basehold %s) takes over", hello.pid, hello.version)
        parts.gate.close()
        sent: list[int] = []
        try:
            self._settle()
            parts.flush()
            if self.db is not None:
                self.db.freeze()
            offer, sent = self._offer(hello)
            channel.send(offer, sent)
            close_all(sent)
            sent = []
            _, fds = channel.receive(TakenMessage, TAKEN_SECONDS)
            close_all(fds)
            self.handed_to = hello.pid  # from here on nothing is undone
            parts.placement.handed([m.load_id for m in offer.models])
            with contextlib.suppress(ChannelClosed, OSError):
                channel.send(Released())
        except (ChannelClosed, ChannelTimeout, BadMessage, OSError) as exc:
            close_all(sent)
            self._resume(f"the successor (pid {hello.pid}) did not take it: {exc}")
            return
        except BaseException:
            close_all(sent)
            self._resume("it failed here")
            raise
        # From now on nothing here is news: a load that ends while this one drains is not
        # reported (to the keeper, the node's labels, events) and ends with the rest.
        parts.registry.silence()
        log.info(
            "handover: pid %d holds %d model(s) now (%.0f ms); this process serves no more",
            hello.pid,
            len(offer.models),
            (time.monotonic() - started) * 1000,
        )
        if not offer.http:  # its own listener: answer handed_over from now on
            self.let_go()
        # else the successor accepts on the same listener: this one stops accepting, answers
        # what it accepted already, and lets go once the last request was answered.
        parts.after(offer.http)

    def _settle(self) -> None:
        """Answer the changes in flight; let loads in progress finish (up to `load_wait`)."""
        parts = self.parts
        if not parts.gate.wait_idle(30.0):
            log.warning("handover: a change was still being answered after 30 s; going on")
        deadline = time.monotonic() + parts.load_wait
        while any(r.state in (State.QUEUED, State.LOADING) for r in parts.registry.records()):
            if time.monotonic() > deadline:
                log.warning(
                    "handover: loads still in progress after %.0f s: the successor starts "
                    "them again",
                    parts.load_wait,
                )
                return
            time.sleep(0.02)

    def _offer(self, hello: Hello) -> tuple[Offer, list[int]]:
        parts = self.parts
        fds: list[int] = []
        try:
            http = parts.http is not None and hello.netns == network_namespace()
            if http and parts.http is not None:
                fds.append(os.dup(parts.http.fileno()))
            fds.append(parts.worker_socket.dup_listener())
            models = []
            runners = hello.pidns == pid_namespace()
            for record in parts.registry.records():
                held = record.loaded
                if record.state != State.READY or held is None:
                    continue  # a load in progress: started again there
                if not _seen_by(held, hello.gpus):
                    log.warning(
                        "handover: %s is on a GPU pid %d does not see: it loads it again",
                        record.id,
                        hello.pid,
                    )
                    continue
                if held.needs_runner and not runners:  # it ends with this PID namespace
                    log.warning(
                        "handover: %s is held by a runner and pid %d is in another PID "
                        "namespace: it loads it again",
                        record.id,
                        hello.pid,
                    )
                    continue
                try:
                    model_fds, runner = parts.placement.handover_fds(record.load_id)
                except Exception:
                    continue  # unloaded meanwhile
                fds.extend(model_fds)
                models.append(OfferedModel.of(record, held, len(model_fds), runner))
        except BaseException:
            close_all(fds)
            raise
        return Offer(pid=os.getpid(), http=http, models=models), fds

    def _resume(self, why: str) -> None:
        parts = self.parts
        if self.db is not None:
            self.db.thaw()
        parts.resync()  # what changed while it was frozen (a load that ended, a lease)
        parts.flush()
        parts.gate.open()
        log.warning("handover: %s; still serving as before", why)

    def let_go(self) -> None:
        """Past Taken: end loads and runners, close every fd, release the lock (then the
        successor goes on), end the template. Once; a no-op before a handover."""
        if self.handed_to is None or self._let_go:
            return
        self._let_go = True
        parts = self.parts
        parts.gate.hand_over(self.handed_to)
        parts.registry.silence()
        for name, step in (
            ("stop the worker socket", lambda: parts.worker_socket.stop(unlink=False)),
            ("end loads and runners, close fds", parts.registry.let_go),
            ("close the state database", self.db.close if self.db else lambda: None),
            ("release the state lock", parts.lock.release),  # the successor goes on
            ("end the loader template", parts.registry.shutdown),
        ):
            began = time.monotonic()
            try:
                step()
            except Exception:
                log.exception("handover: %s failed; going on", name)
            log.info("handover: %s (%.0f ms)", name, (time.monotonic() - began) * 1000)


def _seen_by(held: Held, gpus: list[str]) -> bool:
    """Whether every device segment of `held` is on one of `gpus` (UUIDs)."""
    handle = held.placed.handle
    segments = handle.segments if handle is not None else []
    return all(any(same_gpu(s.device_uuid, gpu) for gpu in gpus) for s in segments)
