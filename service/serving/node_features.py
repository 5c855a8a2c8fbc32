"""Node labels without RBAC: a Node Feature Discovery feature file.

The NVIDIA GPU operator deploys Node Feature Discovery (NFD); its worker reads "local"
feature files from `/etc/kubernetes/node-feature-discovery/features.d/` and labels the node
with each `name=value` line as `feature.node.kubernetes.io/<name>=<value>`. With
`BASEHOLD_NODE_FEATURES_FILE` pointing into that folder (mounted from the host), basehold
keeps one file there, rewritten atomically on every change:

    basehold.ready=true
    basehold-model.<label-safe model id>=ready      # one per ready, shareable model

so a training Job can ask for a node that holds its base with node affinity on
`feature.node.kubernetes.io/basehold-model.<id>`, and nothing in the service needs
Kubernetes API access. The file is removed at shutdown (its labels go with it).

The folder must be this user's and writable by no one else (checked at start, and again on
the folder's fd before each write): whoever can write it could plant a symlink at the
file's name. The file is written as a new temporary file (`O_CREAT|O_EXCL|O_NOFOLLOW`, a
random name, its mode set on the fd) renamed over the file's name, all relative to the
checked folder's fd: no symlink is ever followed, no path is ever chmod-ed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
from pathlib import Path

from service.common.private_dir import FolderUnsafe, check_private, open_folder
from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State
from service.serving.state.writer import OrderedWriter

log = logging.getLogger("basehold.node_features")
PREFIX = "basehold-model."
READY = "basehold.ready=true"
NAME_MAX = 63  # a label name (the part after the prefix's "/")
SETTING = "BASEHOLD_NODE_FEATURES_FILE"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def label_name(model_id: str) -> str:
    """`basehold-model.<id>` when the id is label-safe and fits in 63 characters; else the
    id with other characters as "-", cut to fit, plus 8 hex digits of its SHA-256 (so two
    ids never share a label). Starts and ends alphanumeric, as label names must."""
    name = PREFIX + model_id
    if len(name) <= NAME_MAX and not _UNSAFE.search(model_id) and model_id[-1:].isalnum():
        return name
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:8]
    room = NAME_MAX - len(PREFIX) - len(digest) - 1
    safe = _UNSAFE.sub("-", model_id)[:room].strip("._-")
    return f"{PREFIX}{safe}-{digest}" if safe else f"{PREFIX}{digest}"


class NodeFeatures:
    """Keeps the feature file in step with the registry (subscribe `on_transition`)."""

    def __init__(self, path: Path, writer: OrderedWriter) -> None:
        """Raises FolderUnsafe (the message says what to change) unless `path`'s folder
        exists, is this user's and no one else can write it: a service configured so
        refuses to start before it starts anything."""
        check_private(path.parent, SETTING, create=False)
        self.path = path
        self._writer = writer
        self._lock = threading.Lock()
        self._models: set[str] = set()
        self._serving = False

    def start(self) -> None:
        """The service is up: say so (ready models are added as they become ready).
        Raises FolderUnsafe when the file's folder is not this user's alone."""
        folder = open_folder(self.path.parent, SETTING, create=False)
        try:
            self._clear_temporaries(folder)
        finally:
            os.close(folder)
        with self._lock:
            self._serving = True
            lines = self._lines()
        self._submit(lines)

    def on_transition(self, record: ModelRecord, previous: State, target: State) -> None:
        if previous == target:  # progress, not a change
            return
        held = target == State.READY and record.shareable
        with self._lock:
            if held == (record.id in self._models):
                return
            if held:
                self._models.add(record.id)
            else:
                self._models.discard(record.id)
            if not self._serving:
                return
            lines = self._lines()
        self._submit(lines)

    def stop(self) -> None:
        """Shutdown: the file goes, and the node's basehold labels with it."""
        with self._lock:
            self._serving = False
        self._writer.flush()
        try:
            folder = open_folder(self.path.parent, SETTING, create=False)
        except (FolderUnsafe, OSError) as exc:
            log.warning("could not remove the node features file %s: %s", self.path, exc)
            return
        try:
            os.unlink(self.path.name, dir_fd=folder)  # a name: never follows a symlink
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove the node features file %s: %s", self.path, exc)
        finally:
            os.close(folder)

    def _lines(self) -> list[str]:
        return [READY, *sorted(f"{label_name(m)}=ready" for m in self._models)]

    def _submit(self, lines: list[str]) -> None:
        # Queued in order (under the registry's lock when a transition calls this) and
        # written once that lock is let go: no file I/O while it is held.
        self._writer.submit(lambda: self._write(lines))
        self._writer.flush()

    def _temporary_prefix(self) -> str:
        return f".{self.path.name}."

    def _clear_temporaries(self, folder: int) -> None:
        """Temporary files a crashed instance left (or anything planted under such a
        name, symlinks included: unlinking a name never follows it)."""
        prefix = self._temporary_prefix()
        for name in os.listdir(folder):
            if name.startswith(prefix) and name.endswith(".tmp"):
                try:
                    os.unlink(name, dir_fd=folder)
                except OSError as exc:
                    log.warning("could not remove %s in %s: %s", name, self.path.parent, exc)

    def _write(self, lines: list[str]) -> None:
        """Atomically (NFD never reads half a file), in the folder as checked now."""
        if not self._serving:
            return
        try:
            folder = open_folder(self.path.parent, SETTING, create=False)
        except (FolderUnsafe, OSError) as exc:
            log.warning("not writing the node features file %s: %s", self.path, exc)
            return
        temporary = f"{self._temporary_prefix()}{secrets.token_hex(8)}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temporary, flags, 0o600, dir_fd=folder)
            try:
                os.fchmod(fd, 0o644)  # NFD's worker reads it as another user
                data = memoryview(("\n".join(lines) + "\n").encode())
                while data:
                    data = data[os.write(fd, data) :]
            finally:
                os.close(fd)
            os.rename(temporary, self.path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except OSError as exc:
            log.warning("could not write the node features file %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=folder)
        finally:
            os.close(folder)
