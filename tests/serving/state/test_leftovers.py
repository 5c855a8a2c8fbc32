from __future__ import annotations

from pathlib import Path

from service.serving.state.leftovers import clean_offload


def test_clean_offload_removes_every_folder(tmp_path: Path) -> None:
    (tmp_path / "m.1234").mkdir()
    (tmp_path / "m.1234" / "weights.dat").write_bytes(b"x")
    (tmp_path / "stray.tmp").write_bytes(b"y")
    assert clean_offload(tmp_path) == 2
    assert list(tmp_path.iterdir()) == []
    assert clean_offload(tmp_path / "missing") == 0
