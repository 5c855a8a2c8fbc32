"""What `kubectl apply -k` applies (issue 27, "Manifests an operator can apply"): every build
under deploy/ rendered by the real kustomize (kubectl's) and validated strictly; the base
needs no CRD, the monitoring overlay adds the operator's objects; the image is set once;
the state outlives the pod; the example Job finds its model preloaded, saves its adapter on
a PVC and uses a key with the scopes it needs."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from service.common.load.spec import LoadRequest
from service.serving.node_features import label_name
from service.serving.preload import read_entries
from service.serving.settings import Settings
from tests.deploy.test_container import DEPLOY, ROOT, containers, dockerfile_env, docs, tool

BASE = "base"
MONITORING = "overlays/monitoring"
TRAINING = "examples/training-job"
WORKER_IN_POD = "examples/worker-in-pod"
BUILDS = (".", MONITORING, TRAINING, WORKER_IN_POD)
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
POD_KINDS = ("DaemonSet", "Job", "Deployment")


def kustomize_command() -> list[str]:
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    kubectl = shutil.which("kubectl")
    assert kubectl, "kustomize is missing: install kubectl (`kubectl kustomize` is kustomize)"
    return [kubectl, "kustomize"]


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(build: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/<build>` applies."""
    if build not in _rendered:
        result = subprocess.run(
            [*kustomize_command(), str(DEPLOY / build)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, (build, result.stderr)
        _rendered[build] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return _rendered[build]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    [found] = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    return found


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def mount_of(spec: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume `container` sees `path` on (the mount whose path is the longest prefix)."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if PurePosixPath(path).is_relative_to(m["mountPath"])
    ]
    assert mounts, (container["name"], path)
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume: dict[str, Any] = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return volume


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("build", BUILDS)
def test_every_build_renders_and_validates_strictly(build: str, tmp_path: Path) -> None:
    """Objects of known kinds pass the API schemas strictly; the only ones without a schema
    are the Prometheus operator's, and only the monitoring overlay has them."""
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(render(build)))
    result = tool("kubernetes-validate", "--strict", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", result.stdout + result.stderr))
    assert unknown == (OPERATOR_KINDS if build == MONITORING else set()), unknown


def test_the_base_needs_no_crd_and_the_overlay_adds_the_operators_objects() -> None:
    """`kubectl apply -k deploy/` on a plain cluster: only core API groups. The monitoring
    overlay is the base plus a ServiceMonitor, a PrometheusRule and the dashboard."""
    base, overlay = render("."), render(MONITORING)
    assert all("coreos.com" not in o["apiVersion"] for o in base), [o["kind"] for o in base]
    assert not {o["kind"] for o in base} & OPERATOR_KINDS
    assert {o["kind"] for o in base} >= {"Namespace", "DaemonSet", "Service", "ConfigMap"}
    assert all(o in overlay for o in base)  # the very same objects
    added = [o for o in overlay if o not in base]
    assert sorted(o["kind"] for o in added) == ["ConfigMap", "PrometheusRule", "ServiceMonitor"]
    for obj in added:
        assert obj["metadata"]["namespace"] == "basehold"
    dashboard = one(added, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    [board] = dashboard["data"].values()
    assert json.loads(board) == json.loads((DEPLOY / "monitoring" / "dashboard.json").read_text())
    monitor = one(added, "ServiceMonitor")
    [service] = [o for o in base if o["kind"] == "Service"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_the_prometheus_rule_is_the_promtool_tested_rules() -> None:
    """The operator gets rules.yaml's group, the one promtool's unit tests run on."""
    rule = one(render(MONITORING), "PrometheusRule")
    rules = yaml.safe_load((DEPLOY / "monitoring" / "rules.yaml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]


def test_no_example_is_in_the_base() -> None:
    assert not [o for o in render(".") if o["kind"] in ("Job", "Secret")]
    assert not [o for o in render(MONITORING) if o["kind"] in ("Job", "Secret")]


def test_the_image_is_set_once() -> None:
    """One `images:` entry in base/kustomization.yaml names it; manifests say its
    placeholder; every container of every build runs it."""
    kustomization = yaml.safe_load((DEPLOY / BASE / "kustomization.yaml").read_text())
    [image] = kustomization["images"]
    reference = f"{image['newName']}:{image['newTag']}"
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    holding = [p for p in files if image["newName"] in p.read_text()]
    assert holding == [DEPLOY / BASE / "kustomization.yaml"], holding
    seen = 0
    for build in BUILDS:
        for obj in render(build):
            if obj["kind"] in POD_KINDS:
                for container in containers(pod_spec(obj)):
                    assert container["image"] == reference, (build, container["name"])
                    seen += 1
    assert seen >= 6  # the DaemonSet's two, the training Job's, worker-in-pod's two, ...
    for path in files:
        if path.suffix == ".yaml":
            for doc in docs(path):
                if isinstance(doc, dict) and doc.get("kind") in POD_KINDS:
                    for container in containers(pod_spec(doc)):
                        assert container["image"] == image["name"], (path, container["name"])


def test_the_state_is_on_the_node_and_the_services_alone() -> None:
    """BASEHOLD_STATE_DIR's parent is a hostPath, so a rollout (a new pod) restores every
    model and lease; the root init container makes it the service's, 0700 (run for real,
    as root, by test_container's test_the_daemonset_gives_no_one_else_...)."""
    daemonset = one(render("."), "DaemonSet")
    spec = pod_spec(daemonset)
    service = next(c for c in spec["containers"] if c["name"] == "basehold")
    set_here = env_of(service).get("BASEHOLD_STATE_DIR", {}).get("value")
    state_dir = str(set_here or dockerfile_env()["BASEHOLD_STATE_DIR"])  # the image's default
    volume = mount_of(spec, service, state_dir)
    assert volume["hostPath"]["type"] == "DirectoryOrCreate", volume
    assert not [v for v in spec["volumes"] if "emptyDir" in v]
    [init] = [c for c in spec["initContainers"] if c["name"] == "host-folders"]
    [mount] = [m for m in init["volumeMounts"] if m["name"] == volume["name"]]
    script = " ".join(init["args"])
    uid = service["securityContext"]["runAsUser"]
    assert f"chown {uid} {mount['mountPath']}" in script
    assert f"chmod 0700 {mount['mountPath']}" in script


def test_a_rollout_hands_over_beside_the_old_pod() -> None:
    """The new pod starts beside the old one on the node (surge) and takes over from it
    through the state hostPath: the old one stays until the new one is Ready (its /readyz
    answers 503 until it holds the models), then idles (not exits: kubelet would restart
    it, and it would take over back) and stays live meanwhile (/healthz answers it). No
    hostPort, which would keep the new pod off the node the old one holds it on; the GPU
    through the scheduler, which time-slicing lets both pods have (the docs say so)."""
    daemonset = one(render("."), "DaemonSet")
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    spec = pod_spec(daemonset)
    service = next(c for c in spec["containers"] if c["name"] == "basehold")
    env = env_of(service)
    assert env["BASEHOLD_TAKE_OVER"] == {"name": "BASEHOLD_TAKE_OVER", "value": "true"}
    assert env["BASEHOLD_AFTER_HANDOVER"] == {"name": "BASEHOLD_AFTER_HANDOVER", "value": "idle"}
    read = Settings(
        take_over=env["BASEHOLD_TAKE_OVER"]["value"],
        after_handover=env["BASEHOLD_AFTER_HANDOVER"]["value"],
    )  # as the service reads them
    assert read.take_over is True and read.after_handover == "idle"
    assert service["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert service["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # HTTP serves only after the takeover, which may wait for the old pod's loads in
    # progress, its offer (a minute more) and its state lock (a minute): liveness does not
    # count before then.
    startup = service["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    load_wait = Settings.model_fields["handover_load_wait_seconds"].default
    assert startup["periodSeconds"] * startup["failureThreshold"] >= load_wait + 60 + 60 + 60
    for container in containers(spec):
        for port in container.get("ports", []):
            assert "hostPort" not in port, (container["name"], port)
    assert 30 <= spec["terminationGracePeriodSeconds"] <= 300
    assert service["resources"]["limits"]["nvidia.com/gpu"] == 1
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    section = re.split(r"\n##+ ", text.split("\n### Rollouts without reloading\n", 1)[1])[0]
    assert "maxSurge: 1" in section and "gpu-time-slicing.yaml" in section


def test_a_crash_in_the_pod_keeps_the_models() -> None:
    """The basehold container runs under the keeper (BASEHOLD_KEEPER, as the service reads
    it): the image's entrypoint execs `basehold serve`, which execs the keeper, so the
    keeper is the container's PID 1 and starts a serving process that dies again inside
    the pod with its models kept. A rollout's new pod still takes over (its keeper's first
    child does). docs/kubernetes.md says so."""
    spec = pod_spec(one(render("."), "DaemonSet"))
    service = next(c for c in spec["containers"] if c["name"] == "basehold")
    env = env_of(service)
    assert env["BASEHOLD_KEEPER"] == {"name": "BASEHOLD_KEEPER", "value": "true"}
    read = Settings(keeper=env["BASEHOLD_KEEPER"]["value"])  # as the service reads it
    assert read.keeper is True
    assert env["BASEHOLD_TAKE_OVER"]["value"] == "true"  # not --take-over: the keeper drops it
    assert "command" not in service and service["args"] == ["serve"]  # the image's entrypoint
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "exec basehold serve" in entrypoint
    assert "BASEHOLD_KEEPER" in (ROOT / "docs" / "kubernetes.md").read_text()


def preloaded(objects: list[dict[str, Any]], tmp_path: Path) -> list[LoadRequest]:
    """The DaemonSet's BASEHOLD_PRELOAD file as the pod sees it: the ConfigMap mounted at
    its folder, the key its file name; read by the service's own reader."""
    spec = pod_spec(one(objects, "DaemonSet"))
    service = next(c for c in spec["containers"] if c["name"] == "basehold")
    path = PurePosixPath(env_of(service)["BASEHOLD_PRELOAD"]["value"])
    volume = mount_of(spec, service, str(path))
    [mount] = [m for m in service["volumeMounts"] if m["name"] == volume["name"]]
    assert path.parent == PurePosixPath(mount["mountPath"]) and mount.get("readOnly")
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    local = tmp_path / path.name
    local.write_text(config_map["data"][path.name])
    return [LoadRequest.model_validate(entry) for entry in read_entries(local)]


def test_the_daemonset_preloads_the_models_of_the_config_map(tmp_path: Path) -> None:
    requests = preloaded(render("."), tmp_path)
    assert requests and all(r.name for r in requests)
    written = read_entries(DEPLOY / BASE / "models.yaml")
    assert [r.model_dump(exclude_unset=True) for r in requests] == [
        LoadRequest.model_validate(e).model_dump(exclude_unset=True) for e in written
    ]


def test_the_training_job_waits_for_a_preloaded_model(tmp_path: Path) -> None:
    """The Job's --model is the id of a preload entry (its name), and its node affinity is
    the label basehold's feature file gives a node once that model is ready."""
    objects = render(TRAINING)
    names = {r.name for r in preloaded(objects, tmp_path)}
    job = one(objects, "Job")
    [worker] = pod_spec(job)["containers"]
    args = worker["args"]
    model = args[args.index("--model") + 1]
    assert model in names, (model, names)
    terms = pod_spec(job)["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    [expression] = terms["nodeSelectorTerms"][0]["matchExpressions"]
    assert expression["key"] == f"feature.node.kubernetes.io/{label_name(model)}"
    assert expression["values"] == ["ready"]


@pytest.mark.parametrize("build", [TRAINING, WORKER_IN_POD])
def test_the_adapter_is_saved_on_a_pvc_of_the_example(build: str) -> None:
    objects = render(build)
    job = one(objects, "Job")
    spec = pod_spec(job)
    worker = next(c for c in spec["containers"] if c["name"] == "worker")
    words = " ".join([*worker.get("command", []), *worker.get("args", [])]).split()
    out = words[words.index("--out") + 1]
    volume = mount_of(spec, worker, out)
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvc = one(objects, "PersistentVolumeClaim", claim)
    assert pvc["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert (
        "ReadWriteOnce" in pvc["spec"]["accessModes"]
        or "ReadWriteMany" in pvc["spec"]["accessModes"]
    )


def secret_example() -> tuple[dict[str, str], dict[str, list[str]]]:
    """The example Secret's values and its api-keys (placeholder key -> scopes), the scopes
    validated as the service reads BASEHOLD_API_KEYS (Settings), under real keys: the
    service refuses the placeholders themselves, so the example cannot be applied as is."""
    secret = one(docs(DEPLOY / "examples" / "secret.example.yaml"), "Secret")
    values: dict[str, str] = secret["stringData"]
    placeholders: dict[str, Any] = json.loads(values["api-keys"])
    with pytest.raises(ValueError, match="placeholder"):
        Settings(api_keys=placeholders)
    real = {secrets.token_urlsafe(24): key for key in placeholders}
    chosen: dict[str, Any] = {key: placeholders[p] for key, p in real.items()}
    scopes = Settings(api_keys=chosen).api_keys
    return values, {real[k]: list(s) for k, s in scopes.items()}


def test_the_example_keys_have_the_scopes_jobs_need() -> None:
    """A training job's key: ensure (load if absent) and worker (lease), nothing more; the
    metrics key reads. The `kubectl create secret` line in the file says the same."""
    values, keys = secret_example()
    assert sorted(keys[values["job-key"]]) == ["ensure", "worker"]
    assert keys[values["metrics-key"]] == ["read"]
    text = (DEPLOY / "examples" / "secret.example.yaml").read_text()
    literal = re.search(r"--from-literal=api-keys='([^']+)'", text)
    assert literal
    documented = json.loads(literal.group(1))
    assert sorted(map(sorted, documented.values())) == sorted(map(sorted, keys.values()))
    named = set(re.findall(r"--from-literal=([\w-]+)=", text))
    assert named == set(values), (named, set(values))


def secret_refs(container: dict[str, Any]) -> dict[str, str]:
    """env name -> key of basehold-secrets it is taken from."""
    return {
        name: env["valueFrom"]["secretKeyRef"]["key"]
        for name, env in env_of(container).items()
        if "secretKeyRef" in env.get("valueFrom", {})
        and env["valueFrom"]["secretKeyRef"]["name"] == "basehold-secrets"
    }


@pytest.mark.parametrize("build", [".", MONITORING, TRAINING, WORKER_IN_POD])
def test_every_key_a_pod_takes_is_in_the_secret_with_the_scopes_it_needs(build: str) -> None:
    """Each secretKeyRef names a key of the example Secret; a worker's token has ensure
    and worker (so `basehold load` and Client.ensure are allowed, and leases)."""
    values, keys = secret_example()
    for obj in render(build):
        if obj["kind"] not in POD_KINDS:
            continue
        for container in containers(pod_spec(obj)):
            refs = secret_refs(container)
            assert set(refs.values()) <= set(values), (build, container["name"], refs)
            if "BASEHOLD_TOKEN" in refs:
                scopes = keys[values[refs["BASEHOLD_TOKEN"]]]
                assert {"ensure", "worker"} <= set(scopes), (build, container["name"])
    monitor = [o for o in render(build) if o["kind"] == "ServiceMonitor"]
    for obj in monitor:
        key = obj["spec"]["endpoints"][0]["authorization"]["credentials"]["key"]
        assert keys[values[key]] == ["read"]


def test_worker_in_pod_loads_with_a_key_that_may(tmp_path: Path) -> None:
    """`basehold load` is POST /v1/models: the token it sends has the ensure scope (a
    worker-only key is answered 403)."""
    values, keys = secret_example()
    job = one(render(WORKER_IN_POD), "Job")
    worker = next(c for c in pod_spec(job)["containers"] if c["name"] == "worker")
    assert "basehold load" in " ".join(worker["args"])
    token = secret_refs(worker)["BASEHOLD_TOKEN"]
    assert "ensure" in keys[values[token]]


def test_worker_in_pod_is_one_pod_without_the_daemonset() -> None:
    kinds = sorted(o["kind"] for o in render(WORKER_IN_POD))
    assert kinds == [
        "Job",
        "Namespace",
        "PersistentVolumeClaim",
        "PersistentVolumeClaim",
        "ResourceClaimTemplate",
    ]


def test_pod_security_levels() -> None:
    """The base's hostPath volumes need a `privileged` namespace, and its Namespace says
    so; worker-in-pod has no host folder and meets `restricted` (what the docs offer
    instead)."""
    namespace = one(render("."), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert any("hostPath" in v for v in pod_spec(one(render("."), "DaemonSet"))["volumes"])
    job = one(render(WORKER_IN_POD), "Job")
    spec = pod_spec(job)
    allowed = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected"}
    for volume in spec["volumes"]:
        assert set(volume) - {"name"} <= allowed, volume
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in containers(spec):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in context["capabilities"], container["name"]


def test_the_docs_apply_what_exists() -> None:
    """docs/kubernetes.md's `kubectl apply -k` lines name builds this file renders, and it
    says which Pod Security level the socket needs and how to label a namespace."""
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    applied = set(re.findall(r"kubectl apply -k (deploy/[^\s`]*)", text))
    assert applied, "no kubectl apply -k line"
    built = {f"deploy/{b}/".replace("/./", "/") for b in BUILDS}
    assert applied <= built, applied - built
    assert "deploy/" in applied and "deploy/examples/training-job/" in applied
    assert "pod-security.kubernetes.io/enforce=privileged" in text
    assert "kustomize edit set image" in text
    for arg in ("BASE_IMAGE", "CUDA_MAJOR"):
        assert f"ARG {arg}=" in (ROOT / "Dockerfile").read_text() and arg in text
