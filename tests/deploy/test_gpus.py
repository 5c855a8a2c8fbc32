"""A job gets the GPU its base is on (issue 26): pods get GPUs through the scheduler, never
through the image's NVIDIA_VISIBLE_DEVICES=all; the device plugin's time-slicing lets them
share basehold's GPU; the image installs cuda-bindings of its CUDA base's major."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.deploy.test_container import DEPLOY, ROOT, manifests, pod_specs


def gpus_of(container: dict[str, Any]) -> tuple[int, list[str]]:
    """(device plugin GPUs, DRA claims) a container asks the scheduler for."""
    resources = container.get("resources", {})
    limit = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    return limit, [claim["name"] for claim in resources.get("claims", [])]


def running(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers that run beside each other: native sidecars and the main ones (not
    the init containers that run to completion first)."""
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return [*sidecars, *spec["containers"]]


def test_every_container_gets_its_gpu_from_the_scheduler() -> None:
    """basehold and every training container ask for a GPU; in one pod they share one DRA
    claim (two nvidia.com/gpu limits could be two GPUs); nobody says NVIDIA_VISIBLE_DEVICES."""
    for where, spec in pod_specs():
        asked = {c["name"]: gpus_of(c) for c in running(spec)}
        assert all(limit or claims for limit, claims in asked.values()), (where, asked)
        if len(asked) > 1:
            claims = [set(c) for _, c in asked.values()]
            assert all(c and c == claims[0] for c in claims), (where, asked)
            pod_claims = {claim["name"] for claim in spec.get("resourceClaims", [])}
            assert claims[0] <= pod_claims, where
        for container in running(spec):
            names = {e["name"] for e in container.get("env", [])}
            assert "NVIDIA_VISIBLE_DEVICES" not in names, (where, container["name"])


def test_no_file_exposes_every_gpu() -> None:
    """The CUDA base image's `all` is replaced by `void` in ours: a container of it sees the
    GPUs it asked for, no more."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^\s+NVIDIA_VISIBLE_DEVICES=void$", dockerfile, re.M)
    files = [ROOT / "Dockerfile", *DEPLOY.rglob("*.yaml"), *(ROOT / "docker").glob("*.yaml")]
    for path in files:
        text = path.read_text()
        assert not re.search(r"NVIDIA_VISIBLE_DEVICES\W+all", text), path


def test_the_time_slicing_config_shares_nvidia_gpus() -> None:
    """The device plugin config is well formed (its ConfigMap passed kubernetes-validate
    with the other examples): the GPUs keep the name pods ask for, each is several."""
    [config_map] = [
        d
        for _, d in manifests()
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "time-slicing-config"
    ]
    [config] = [yaml.safe_load(text) for text in config_map["data"].values()]
    assert config["version"] == "v1"
    slicing = config["sharing"]["timeSlicing"]
    assert slicing["renameByDefault"] is False and slicing["failRequestsGreaterThanOne"] is True
    [gpu] = slicing["resources"]
    assert gpu["name"] == "nvidia.com/gpu" and gpu["replicas"] >= 2


def test_the_compose_worker_uses_baseholds_gpu() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    devices = [
        service["deploy"]["resources"]["reservations"]["devices"]
        for service in compose["services"].values()
    ]
    assert len(devices) == 2 and devices[0] == devices[1]
    assert "count" not in devices[0][0]  # count: 1 each need not be the same GPU


def test_the_image_pins_the_bindings_of_its_cuda_major() -> None:
    """cuda-bindings of a newer major than the node's driver fail in the driver: the image
    installs the extra of its base's CUDA major, and `gpu` is that extra."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=\S*cuda(\d+)\.\d+", dockerfile, re.M)
    pinned = re.search(r"^ARG CUDA_MAJOR=(\d+)$", dockerfile, re.M)
    assert base and pinned and base.group(1) == pinned.group(1)
    major = int(pinned.group(1))
    assert "[train,gpu-cu${CUDA_MAJOR}]" in dockerfile
    import tomllib  # Python 3.11+, as the tests run (the package supports 3.10)

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["gpu"] == [f"basehold[gpu-cu{major}]"]
    for cuda in (12, 13):
        [requirement] = extras[f"gpu-cu{cuda}"]
        bounds = re.fullmatch(r"cuda-bindings>=(\d+)[.\d]*,<(\d+)", requirement)
        assert bounds and (int(bounds.group(1)), int(bounds.group(2))) == (cuda, cuda + 1)
