"""What schemas cannot check: the container and Kubernetes files against the real app."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tempfile
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


KUSTOMIZE_KINDS = ("Kustomization", "Component")


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object written under deploy/ (base, components, examples), as
    written: images say `basehold` (kustomize sets them: tests/deploy/test_kustomize.py
    checks the rendered builds). Not kustomization files, nor data files (models.yaml,
    the alerting rules)."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in docs(path):
            kind = doc.get("kind") if isinstance(doc, dict) else None
            if kind and "apiVersion" in doc and kind not in KUSTOMIZE_KINDS:
                found.append((path, doc))
    return found


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


# Compose: tests/deploy/test_compose.py (its env file is the operator's, not in git).


def dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return dict(re.findall(r"^\s+(BASEHOLD_\w+)=(\S+)", text, re.M))


def test_dockerfile_makes_a_private_socket_folder() -> None:
    folder = str(Path(dockerfile_env()["BASEHOLD_SOCKET"]).parent)
    assert f"install -d -m 0700 -o 10001 {folder}" in (ROOT / "Dockerfile").read_text()


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
    from service.serving.app import create_app
    from service.serving.settings import Settings

    tmp = tmp_path_factory.mktemp("deploy")
    app = create_app(
        Settings(
            state_dir=tmp / "state",
            socket=Path(tempfile.mkdtemp(prefix="bh-")) / "basehold.sock",
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


def test_gpu_limit_and_socket_folder() -> None:
    """The service's pod: a GPU (one device plugin GPU, or a DRA claim) and the socket folder
    mounted where the handles name it; nothing else is shared with workers (no /dev/shm, no
    PID namespace): arenas and GPU segments are fds passed over the socket."""
    for where, spec in pod_specs():
        service = next((c for c in containers(spec) if c["name"] == "basehold"), None)
        if service is None:
            continue  # a training job: test_training_job_finds_its_node_and_the_socket
        resources = service["resources"]
        assert resources.get("limits", {}).get("nvidia.com/gpu") == 1 or resources.get("claims"), (
            where
        )
        env = {e["name"]: e.get("value") for e in service["env"]}
        socket = Path(env["BASEHOLD_SOCKET"])
        for container in containers(spec):
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/dev/shm" not in mounts, where
            if container["name"] in ("basehold", "worker"):
                # Every container sees the socket at the path the service's handles name.
                mount = next(m for m in mounts if socket.is_relative_to(m))
                assert mounts[mount] == "run", where
        assert "shareProcessNamespace" not in spec, where
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), where


def test_the_daemonset_shares_the_socket_and_labels_its_node() -> None:
    [spec] = [s for where, s in pod_specs() if "daemonset" in where]
    service = next(c for c in containers(spec) if c["name"] == "basehold")
    env = {e["name"]: e.get("value") for e in service["env"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["run"]["hostPath"]["path"] == "/run/basehold"
    assert (
        env["BASEHOLD_SOCKET_GROUP"] == "20001"
        and 20001 in spec["securityContext"]["supplementalGroups"]
    )
    features = Path(env["BASEHOLD_NODE_FEATURES_FILE"])
    mounts = {m["mountPath"]: m["name"] for m in service["volumeMounts"]}
    assert mounts[str(features.parent)] == "nfd-features"
    assert volumes["nfd-features"]["hostPath"]["path"] == str(features.parent)
    assert service["securityContext"]["runAsUser"] == 10001


def test_training_job_finds_its_node_and_the_socket() -> None:
    [daemonset] = [s for where, s in pod_specs() if "daemonset" in where]
    service = next(c for c in containers(daemonset) if c["name"] == "basehold")
    socket = Path(next(e["value"] for e in service["env"] if e["name"] == "BASEHOLD_SOCKET"))
    [job] = [s for where, s in pod_specs() if "training-job" in where]
    terms = job["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    [expression] = terms["nodeSelectorTerms"][0]["matchExpressions"]
    assert expression["key"] == "feature.node.kubernetes.io/basehold-model.llama-q4"
    assert expression["values"] == ["ready"]
    assert 20001 in job["securityContext"]["supplementalGroups"]
    assert job["securityContext"]["runAsUser"] not in (0, 10001)  # another uid
    [worker] = containers(job)
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    mount = next(m for m in mounts if socket.is_relative_to(m))
    volume = next(v for v in job["volumes"] if v["name"] == mounts[mount])
    assert volume["hostPath"]["path"] == "/run/basehold"


def test_secrets_only_by_reference() -> None:
    for path, doc in manifests():
        assert doc["kind"] != "Secret" or path.name == "secret.example.yaml", path
    for where, spec in pod_specs():
        for container in containers(spec):
            for env in container.get("env", []):
                if re.search(r"KEY|TOKEN|SECRET|PASSWORD", env["name"]):
                    assert "value" not in env, (where, env["name"])
                    assert "secretKeyRef" in env["valueFrom"], (where, env["name"])
    monitor = next(d for _, d in manifests() if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert "credentials" in monitor["spec"]["endpoints"][0]["authorization"]


def run_host_folders(daemonset: Path, root: Path) -> dict[str, Path]:
    """Run the DaemonSet's root init container's script for real, its mounts under `root`
    as the kubelet makes them (a hostPath DirectoryOrCreate root 0755; an emptyDir root,
    0777 plus the fsGroup's setgid): volume name -> where it is."""
    [spec] = [d["spec"]["template"]["spec"] for d in docs(daemonset) if d["kind"] == "DaemonSet"]
    [init] = [c for c in spec["initContainers"] if c["name"] == "host-folders"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    script = " ".join(init["args"])
    where: dict[str, Path] = {}
    for mount in sorted(init["volumeMounts"], key=lambda m: -len(m["mountPath"])):
        folder = root / mount["name"]
        folder.mkdir()
        folder.chmod(0o2777 if "emptyDir" in volumes[mount["name"]] else 0o755)
        script = script.replace(mount["mountPath"], str(folder))
        where[mount["name"]] = folder
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return where


def service_mounts(daemonset: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The service container's env (and the image's) and its mounts (path -> volume)."""
    [spec] = [d["spec"]["template"]["spec"] for d in docs(daemonset) if d["kind"] == "DaemonSet"]
    service = next(c for c in spec["containers"] if c["name"] == "basehold")
    env = {**dockerfile_env(), **{e["name"]: e.get("value") for e in service["env"]}}
    return env, {m["mountPath"]: m["name"] for m in service["volumeMounts"]}


def check_folders_are_the_services_alone(daemonset: Path, root: Path) -> None:
    """The features folder and the state dir's parent, as the pod starts, pass the checks
    basehold makes (its uid's, writable by no one else): the feature file's folder could
    otherwise get a symlink planted by a socket-group member, the state dir be swapped."""
    env, mounts = service_mounts(daemonset)
    uid = 10001
    where = run_host_folders(daemonset, root)
    features = mounts[str(Path(env["BASEHOLD_NODE_FEATURES_FILE"]).parent)]
    state_parent = Path(env["BASEHOLD_STATE_DIR"]).parent
    state = next(name for path, name in mounts.items() if state_parent == Path(path))
    for name in (features, state):
        info = where[name].stat()
        assert info.st_uid == uid, (name, info.st_uid)
        assert not info.st_mode & 0o022, (name, oct(info.st_mode))
    # The state database is on the node (hostPath) and nobody else's to read.
    assert stat.S_IMODE(where[state].stat().st_mode) == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the init container's chown")
def test_the_daemonset_gives_no_one_else_the_features_folder_or_the_state_volume(
    tmp_path: Path,
) -> None:
    check_folders_are_the_services_alone(DEPLOY / "base" / "daemonset.yaml", tmp_path)
