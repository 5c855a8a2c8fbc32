"""Disk admission of hub downloads: what the admitted downloads will still write."""

from __future__ import annotations

import pytest

from service.common.errors import InsufficientStorage
from service.common.estimates import Download, Estimate
from service.common.load.progress import Phase
from service.common.load.spec import LoadRequest
from service.serving.registry.downloads import in_flight, require_disk
from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State

CACHE = "/cache"
FREE = 1 << 40


def dl(snapshot: str, nbytes: int, cache: str = CACHE) -> Download:
    return Download(cache, snapshot, nbytes, FREE)


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
        record("queued", dl("a@1", 1000), state=State.QUEUED),
        # Part-way: what is left of the files it lacked (partial files count as written).
        record("half", dl("b@1", 900), phase=Phase.DOWNLOADING, done=(400, 1000)),
        record("loading", dl("c@1", 500), phase=Phase.LOADING, done=(500, 500)),
        record("ready", dl("d@1", 500), state=State.READY),
        record("elsewhere", dl("e@1", 700, cache="/other")),
        record("local", None),
        record("me", dl("f@1", 300)),
    ]
    assert in_flight(records, CACHE, exclude="me") == {"a@1": 1000, "b@1": 600, "c@1": 0}


def test_loads_of_one_snapshot_count_its_download_once() -> None:
    records = [
        record("fp16", dl("a@1", 1000)),
        record("nf4", dl("a@1", 1000), phase=Phase.DOWNLOADING, done=(300, 1000)),
    ]
    assert in_flight(records, CACHE, exclude="new") == {"a@1": 1000}


def test_a_download_must_fit_beside_those_in_flight() -> None:
    # The cache disk has 1000 bytes free (as the new load's pricing measured it); 600 of
    # them are promised to a download in flight.
    others = [record("first", Download(CACHE, "a@1", 600, 1000))]
    require_disk(Download(CACHE, "a@1", 600, 1000), others, exclude="second")  # same files
    require_disk(Download(CACHE, "b@1", 400, 1000), others, exclude="second")  # 400 + 600
    require_disk(Download("/other", "b@1", 600, 1000), others, exclude="second")  # other disk
    with pytest.raises(InsufficientStorage) as refused:
        require_disk(Download(CACHE, "b@1", 401, 1000), others, exclude="second")
    assert refused.value.message.startswith(
        "Downloading b@1 needs 401 bytes in the HF cache /cache, which has 1000 bytes free, "
        "600 of them to be written by downloads in flight."
    )
