from __future__ import annotations

from pathlib import Path

import pytest

from service.common.errors import InvalidSpec, SourceNotAllowed, SourceNotFound
from service.common.load.sources import HubSource, LocalSource, parse_source


def test_local_under_root(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    assert parse_source(str(tmp_path / "m"), None, [tmp_path]) == LocalSource(tmp_path / "m")


def test_hub_id_defaults_to_main() -> None:
    assert parse_source("acme/llama", None, []) == HubSource("acme/llama", "main")
    assert parse_source("gpt2", "v1", []) == HubSource("gpt2", "v1")


@pytest.mark.parametrize("source", ["relative/../x/y", "a/b/c", "bad id!"])
def test_not_a_hub_id(source: str) -> None:
    with pytest.raises(InvalidSpec):
        parse_source(source, None, [])


def test_root_itself_is_not_a_prefix_match(tmp_path: Path) -> None:
    root = tmp_path / "models"
    sibling = tmp_path / "models-evil"
    root.mkdir()
    sibling.mkdir()
    with pytest.raises(SourceNotAllowed):
        parse_source(str(sibling), None, [root])


def test_file_is_not_a_checkpoint_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(SourceNotFound):
        parse_source(str(tmp_path / "f"), None, [tmp_path])
