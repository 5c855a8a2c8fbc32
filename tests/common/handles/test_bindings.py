"""cuda-bindings against the driver's CUDA version: the comparison takes the versions in
(this machine has no NVIDIA driver); `mismatch` itself asks the real package and driver."""

from __future__ import annotations

import importlib.metadata

import pytest

from service.common.handles import bindings


def test_bindings_of_a_newer_major_than_the_driver_name_the_package_to_install() -> None:
    sentence = bindings.compare("13.0.1", 12040)
    assert sentence is not None
    assert "cuda-bindings 13.0.1 is installed" in sentence
    assert "supports CUDA 12.4" in sentence
    assert "pip install 'cuda-bindings>=12.6,<13'" in sentence
    assert "[gpu-cu12]" in sentence


def test_a_cuda_13_driver_is_told_its_own_major() -> None:
    sentence = bindings.compare("14.1.0", 13020)
    assert sentence is not None
    assert "supports CUDA 13.2" in sentence and "'cuda-bindings>=13,<14'" in sentence
    assert "[gpu-cu13]" in sentence


def test_a_driver_without_an_extra_gets_the_plain_requirement() -> None:
    sentence = bindings.compare("13.0.0", 11080)
    assert sentence is not None
    assert "'cuda-bindings>=11,<12'" in sentence and "extra" not in sentence


@pytest.mark.parametrize(
    ("installed", "driver"),
    [
        ("12.9.0", 12090),  # same major
        ("12.6.0", 12040),  # same major, newer minor: minor-version compatibility
        ("12.6.0", 13000),  # an older major runs on a newer driver
        ("13.0.1", None),  # no driver: nothing to compare
        (None, 12040),  # no bindings: devices.unavailable() says so
        ("13.0.1", 0),
        ("dev", 12040),
    ],
)
def test_nothing_to_say_where_they_match_or_one_side_is_missing(
    installed: str | None, driver: int | None
) -> None:
    assert bindings.compare(installed, driver) is None


def test_the_installed_version_is_the_package_metadata() -> None:
    try:
        expected: str | None = importlib.metadata.version("cuda-bindings")
    except importlib.metadata.PackageNotFoundError:
        expected = None
    assert bindings.installed_version() == expected


def test_mismatch_is_asked_once_and_is_none_without_a_driver() -> None:
    """This machine has no NVIDIA driver: nothing to compare, whatever is installed."""
    if bindings.driver_cuda_version() is not None:
        pytest.skip("this machine has an NVIDIA driver")
    bindings.mismatch.cache_clear()
    assert bindings.mismatch() is None
    assert bindings.mismatch.cache_info().hits == 0
    assert bindings.mismatch() is None
    assert bindings.mismatch.cache_info().hits == 1
