"""Disk admission of hub downloads: what the admitted downloads will still write."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import InsufficientStorage
from service.loading.progress import Phase
from service.loading.spec import LoadRequest
from service.memory.admission import Download, Estimate
from service.memory.disk import free_bytes
from service.registry.downloads import in_flight, require_disk
from service.registry.record import ModelRecord
from service.registry.states import State

CACHE = "/cache"


def record(
    model_id: str,
    download: Download | None,
    state: State = State.LOADING,
    phase: Phase = Phase.RESOLVING,
    done: tuple[int, int] = (0, 0),
) -> ModelRecord:
    made = ModelRecord(id=model_id, name=None, spec=LoadRequest(source="acme/x"), key=model_id)
    made.estimate = Estimate(1, {"cpu": 1}, 1, download)
    made.state = state
    made.progress.phase = phase
    made.progress.bytes_done, made.progress.bytes_total = done
    return made


def test_what_each_download_in_flight_still_writes() -> None:
    records = [
        record("queued", Download(CACHE, "a@1", 1000), state=State.QUEUED),
        # Part-way: what is left of the files it lacked (partial files count as written).
        record("half", Download(CACHE, "b@1", 900), phase=Phase.DOWNLOADING, done=(400, 1000)),
        record("loading", Download(CACHE, "c@1", 500), phase=Phase.LOADING, done=(500, 500)),
        record("ready", Download(CACHE, "d@1", 500), state=State.READY),
        record("elsewhere", Download("/other", "e@1", 700)),
        record("local", None),
        record("me", Download(CACHE, "f@1", 300)),
    ]
    assert in_flight(records, CACHE, exclude="me") == {"a@1": 1000, "b@1": 600, "c@1": 0}


def test_loads_of_one_snapshot_count_its_download_once() -> None:
    records = [
        record("fp16", Download(CACHE, "a@1", 1000)),
        record("nf4", Download(CACHE, "a@1", 1000), phase=Phase.DOWNLOADING, done=(300, 1000)),
    ]
    assert in_flight(records, CACHE, exclude="new") == {"a@1": 1000}


def test_a_download_must_fit_beside_those_in_flight(tmp_path: Path) -> None:
    cache = str(tmp_path / "hf-cache")  # not there yet: its disk is tmp_path's
    free = free_bytes(tmp_path / "hf-cache")
    share = int(free * 0.6)
    others = [record("first", Download(cache, "a@1", share))]
    require_disk(Download(cache, "a@1", share), others, exclude="second")  # the same files
    require_disk(Download(cache, "b@1", share), [], exclude="second")  # alone it fits
    with pytest.raises(InsufficientStorage) as refused:
        require_disk(Download(cache, "b@1", share), others, exclude="second")
    assert f"needs {share} bytes in the HF cache {cache}" in refused.value.message
    assert f"{share} of them to be written by downloads in flight" in refused.value.message
