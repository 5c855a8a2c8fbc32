"""What schemas cannot check: the container and Kubernetes files against the real app."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEPLOY = ROOT / "deploy"


def tool(
    name: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = [DEPLOY / name for name in kustomization["resources"]]
    files += sorted((DEPLOY / "examples").glob("*.yaml"))
    return [(f, d) for f in files for d in docs(f)]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"])
        for path, doc in manifests()
        if doc["kind"] in ("DaemonSet", "Job", "Deployment")
    ]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_hadolint_dockerfile() -> None:
    result = tool("hadolint", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_scripts() -> None:
    scripts = [str(p) for p in [*ROOT.glob("docker/*.sh"), ROOT / ".ci" / "run"]]
    result = tool("shellcheck", *scripts)
    assert result.returncode == 0, result.stdout


def test_compose_config() -> None:
    result = tool(
        "docker-compose",
        "-f",
        "docker/compose.yaml",
        "--profile",
        "train",
        "config",
        "--format",
        "json",
        env={"BASEHOLD_WORKER_TOKEN": "worker-key"},
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    service, worker = services["basehold"], services["worker"]
    assert service["ipc"] == "shareable" and worker["ipc"] == "service:basehold"
    assert int(service["shm_size"]) >= 1 << 30
    for name in ("basehold", "worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    assert "/opt/basehold-examples/train_lora.py" in worker["entrypoint"]
    assert (ROOT / "examples" / "train_lora.py").is_file()


def test_kubernetes_validate_strict() -> None:
    files = sorted({str(path) for path, _ in manifests()})
    result = tool("kubernetes-validate", "--strict", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S*cuda", text, re.M)
    assert re.search(r"^USER 10001$", text, re.M)
    healthcheck = re.search(r"^HEALTHCHECK .*\n.*$", text, re.M)
    assert healthcheck and "curl" not in healthcheck.group(0) and "python3" in healthcheck.group(0)
    assert "EXPOSE 8000" in text and 'ENTRYPOINT ["/usr/local/bin/basehold-entrypoint"]' in text
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert "build==" not in final_stage  # build tools stay in the build stage


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    from service.app import create_app
    from service.settings import Settings

    tmp = tmp_path_factory.mktemp("deploy")
    app = create_app(
        Settings(
            state_dir=tmp / "state",
            shm_dir=Path("/dev/shm") / tmp.name,
            api_keys={"deploy-check-key": ["admin"]},
        )
    )
    client = TestClient(app)
    client.__enter__()
    return client


def test_probes_are_real_open_routes(routes: TestClient) -> None:
    seen = 0
    for where, spec in pod_specs():
        for container in containers(spec):
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in container:
                    path = container[probe]["httpGet"]["path"]
                    # Probes carry no key: the route must answer 200 without one.
                    assert routes.get(path).status_code == 200, (where, probe, path)
                    seen += 1
    assert seen >= 3


def test_gpu_limit_and_shm() -> None:
    for where, spec in pod_specs():
        volumes = {v["name"]: v for v in spec["volumes"]}
        service = next(c for c in containers(spec) if c["name"] == "basehold")
        assert service["resources"]["limits"]["nvidia.com/gpu"] == 1, where
        for container in containers(spec):
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if container["name"] in ("basehold", "worker"):
                shm = volumes[mounts["/dev/shm"]]
                assert shm["emptyDir"]["medium"] == "Memory", where
                assert shm["emptyDir"]["sizeLimit"], where
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), where


def test_secrets_only_by_reference() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert all(d["kind"] != "Secret" for d in docs(DEPLOY / name)), name
    for where, spec in pod_specs():
        for container in containers(spec):
            for env in container.get("env", []):
                if re.search(r"KEY|TOKEN|SECRET|PASSWORD", env["name"]):
                    assert "value" not in env, (where, env["name"])
                    assert "secretKeyRef" in env["valueFrom"], (where, env["name"])
    monitor = next(d for _, d in manifests() if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert "credentials" in monitor["spec"]["endpoints"][0]["authorization"]
