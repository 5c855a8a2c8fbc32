"""The snapshot admission priced, carried to the loader: checked again there like a hub's
listing (a loader process made it, the serving process carried it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.common.load.hub_checks import HubAnswerRefused
from service.common.load.pin import HubPin, PinnedFile
from service.common.load.sources import HubSource
from service.loader.hub import Plan

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ETAG = "ab" * 32


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def test_a_pin_round_trips_to_the_same_plan(cache: Path) -> None:
    source = HubSource("acme/llama", "main")
    pin = HubPin(commit=COMMIT, files=(PinnedFile(name="config.json", size=600, etag=ETAG),))
    plan = Plan.from_pin(source, HubPin.model_validate_json(pin.model_dump_json()))
    assert (plan.commit, plan.cache, plan.cached_folder) == (COMMIT, cache, None)
    assert plan.pin() == pin


@pytest.mark.parametrize(
    ("commit", "name", "etag", "folder"),
    [
        ("../../elsewhere", "config.json", ETAG, None),
        (COMMIT, "../config.json", ETAG, None),
        (COMMIT, "/etc/passwd", ETAG, None),
        (COMMIT, "config.json", "../../blob", None),
        (COMMIT, "config.json", ETAG, "/tmp"),
    ],
    ids=["commit", "dotdot-name", "absolute-name", "etag", "folder-outside-the-cache"],
)
def test_a_pin_that_leaves_the_cache_is_refused(
    cache: Path, commit: str, name: str, etag: str, folder: str | None
) -> None:
    pin = HubPin(
        commit=commit, files=(PinnedFile(name=name, size=1, etag=etag),), cached_folder=folder
    )
    with pytest.raises(HubAnswerRefused):
        Plan.from_pin(HubSource("acme/llama", "main"), pin)
