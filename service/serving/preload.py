"""BASEHOLD_PRELOAD: a YAML or JSON file of load requests (a Kubernetes ConfigMap mounts
well) ensured at start. Each entry is submitted like `POST /v1/models` (idempotent with
what was restored: a held spec is found, not loaded twice); `/readyz` waits until every
entry settled (ready or failed). A bad entry is logged and skipped; the others go on."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from service.common.errors import BaseholdError
from service.common.load.spec import LoadRequest
from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State

log = logging.getLogger("basehold.preload")


class Submits(Protocol):
    def submit(self, request: LoadRequest, token: str | None) -> tuple[ModelRecord, bool]: ...

    def get(self, model_id: str) -> ModelRecord: ...


class PreloadUnreadable(ValueError):
    pass


def read_entries(path: Path) -> list[Any]:
    """The file's entries: a list, or {"models": [...]}; YAML (JSON is YAML too)."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise PreloadUnreadable(f"BASEHOLD_PRELOAD {path} cannot be read: {exc}") from exc
    if isinstance(data, dict) and "models" in data:
        data = data["models"]
    if not isinstance(data, list):
        raise PreloadUnreadable(
            f"BASEHOLD_PRELOAD {path} must be a list of load requests (or {{models: [...]}})"
        )
    return data


class Preload:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: list[str] = []
        self.refused = 0
        self.done = False  # every entry submitted (or refused)

    def run(self, registry: Submits) -> None:
        """Submit every entry. Call it once the service holds its state lock and restored
        what it held (a restored model is then found, not loaded twice); it may block on
        estimates."""
        try:
            entries = read_entries(self.path)
        except PreloadUnreadable as exc:
            log.error("%s; preloading nothing", exc)
            entries = []
        for number, entry in enumerate(entries, start=1):
            try:
                record, queued = registry.submit(LoadRequest.model_validate(entry), None)
            except ValidationError as exc:
                self._refuse(number, f"invalid_spec: {exc.error_count()} problem(s): {exc}")
                continue
            except BaseholdError as exc:
                self._refuse(number, f"{exc.code}: {exc.message}")
                continue
            self.ids.append(record.id)
            log.info("preload %d: %s %s", number, record.id, "queued" if queued else "already held")
        self.done = True

    def _refuse(self, number: int, why: str) -> None:
        self.refused += 1
        log.error("preload entry %d of %s refused: %s", number, self.path, why[:2000])

    def waiting(self, registry: Submits) -> int:
        """Entries not settled yet (-1 while they are still being submitted)."""
        if not self.done:
            return -1
        count = 0
        for model_id in self.ids:
            try:
                state = registry.get(model_id).state
            except BaseholdError:
                continue  # unloaded meanwhile: settled
            count += state in (State.QUEUED, State.LOADING)
        return count
