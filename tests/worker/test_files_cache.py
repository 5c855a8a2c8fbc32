"""The worker's file cache: what the service lists can never place a file outside it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from service.worker.files_cache import fetch_files

DATA = b'{"model_type": "gpt2"}'


def listing(revision: str | None, name: str = "config.json", model: str = "m") -> dict[str, object]:
    digest = hashlib.sha256(DATA).hexdigest()
    return {"model_id": model, "revision": revision, "files": [{"name": name, "sha256": digest}]}


@pytest.mark.parametrize(
    ("revision", "model"),
    [("../../../../escaped", "m"), ("..", "m"), ("a/../../b", "m"), ("main", ".."), (None, "../x")],
)
def test_revision_and_model_id_stay_inside_the_cache(
    tmp_path: Path, revision: str | None, model: str
) -> None:
    root = tmp_path / "cache"
    folder = fetch_files(listing(revision, model=model), lambda name: DATA, root)
    assert root.resolve() in folder.resolve().parents
    assert (folder / "config.json").read_bytes() == DATA
    assert {p.resolve() for p in tmp_path.rglob("config.json")} == {
        (folder / "config.json").resolve()
    }


@pytest.mark.parametrize("name", ["..", ".", "../config.json", ".hidden", "a/b"])
def test_names_that_are_not_plain_file_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(OSError, match="not a plain file name"):
        fetch_files(listing("main", name), lambda _: DATA, tmp_path / "cache")
