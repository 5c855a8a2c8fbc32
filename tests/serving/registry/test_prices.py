"""A local load priced once is not priced again while its spec and files are as they were
when it was priced; a file written or added, another spec, or a placement that follows
free memory is priced again."""

from __future__ import annotations

import os
from pathlib import Path

from service.common.load.spec import LoadRequest
from tests.conftest import until
from tests.serving.registry.conftest import Registries
from tests.serving.registry.fake_backend import MiB, Setup, cpu


def _checkpoint(root: Path) -> Path:
    folder = root / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 64)
    return folder


def _load_and_unload(setup: Setup, folder: Path, **extra: object) -> None:
    request = LoadRequest.model_validate({"source": str(folder), "name": "m", **extra})
    setup.registry.submit(request, None)
    until(lambda: setup.state("m") == "ready", "the load never became ready", 10)
    assert setup.registry.unload("m") is None


def test_a_model_loaded_again_takes_its_price(registries: Registries, tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path)
    setup = registries(roots=[tmp_path])
    setup.backend.prices[str(folder)] = cpu(MiB)
    _load_and_unload(setup, folder, device_map="cpu")
    _load_and_unload(setup, folder, device_map="cpu")
    assert setup.backend.priced == [str(folder)]
    assert len(setup.backend.started("m")) == 2  # loaded twice, priced once

    (folder / "model.safetensors").write_bytes(b"y" * 128)  # re-saved
    _load_and_unload(setup, folder, device_map="cpu")
    (folder / "extra.safetensors").write_bytes(b"z")
    _load_and_unload(setup, folder, device_map="cpu")
    assert setup.backend.priced == [str(folder)] * 3
    os.remove(folder / "extra.safetensors")  # the files as they were priced before
    _load_and_unload(setup, folder, device_map="cpu")
    assert setup.backend.priced == [str(folder)] * 3
    _load_and_unload(setup, folder, device_map="cpu", dtype="float16")  # another spec
    assert setup.backend.priced == [str(folder)] * 4


def test_a_placement_that_follows_free_memory_is_priced_each_time(
    registries: Registries, tmp_path: Path
) -> None:
    """`auto` on a node with a GPU follows the GPUs' free memory; without one, or with
    `max_memory`, it does not."""
    folder = _checkpoint(tmp_path)
    setup = registries(roots=[tmp_path], gpus_seen=1)
    setup.backend.prices[str(folder)] = cpu(MiB)
    _load_and_unload(setup, folder, device_map="auto")
    _load_and_unload(setup, folder, device_map="auto")
    assert setup.backend.priced == [str(folder)] * 2
    for _ in range(2):
        _load_and_unload(setup, folder, device_map="auto", max_memory={"cpu": "1GiB"})
    assert setup.backend.priced == [str(folder)] * 3

    without = registries(roots=[tmp_path], gpus_seen=0)
    without.backend.prices[str(folder)] = cpu(MiB)
    _load_and_unload(without, folder, device_map="auto")
    _load_and_unload(without, folder, device_map="auto")
    assert without.backend.priced == [str(folder)]


def test_an_estimate_and_a_load_share_the_price(registries: Registries, tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path)
    setup = registries(roots=[tmp_path])
    setup.backend.prices[str(folder)] = cpu(MiB)
    request = LoadRequest.model_validate({"source": str(folder), "device_map": "cpu"})
    for _ in range(2):
        estimate, _free = setup.registry.estimate(request, None)
        assert estimate.total_bytes == MiB
    _load_and_unload(setup, folder, device_map="cpu")
    assert setup.backend.priced == [str(folder)]
