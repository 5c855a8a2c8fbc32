"""/readyz follows the loader template: our own is restarted when it dies (and a first
start that failed is retried), a shared one that is gone answers 503 loader_unavailable,
for /readyz and for loads, until it is back."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ClientFactory, load, until, wait_for
from tests.serving.loaders.templates import start_template

DOWN = {"loader_unavailable", "loaders_starting"}
# Its sitecustomize fails the first start of a template at once (BH_TEST_FAIL_ONCE).
FAILING_START = Path(__file__).with_name("failing_start")


def _ready(client: TestClient) -> bool:
    return client.get("/readyz").status_code == 200


def _own_templates() -> set[int]:
    """Live templates this process started for a service of its own (not the session's
    shared one, which lives in a bh-template- folder)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) != os.getpid() or state in ("Z", "X"):
            continue
        if b"service.loader.forker" in command and any(
            b"/basehold-template-" in part for part in command
        ):
            found.add(int(entry))
    return found


def test_readyz_follows_our_own_template_which_is_restarted(
    make_client: ClientFactory, models_root: Path
) -> None:
    before = _own_templates()
    client = make_client(loader_template="")
    until(lambda: _ready(client), "/readyz never said ready", 120)
    (pid,) = _own_templates() - before
    os.kill(pid, signal.SIGKILL)
    until(lambda: not _ready(client), "/readyz still says ready after the template died", 10)
    codes = set()

    def restarted() -> bool:
        answer = client.get("/readyz")
        if answer.status_code == 503:
            codes.add(answer.json()["code"])
        return answer.status_code == 200

    until(restarted, "the loader template was not restarted", 120)
    assert codes and codes <= DOWN, codes
    assert len(_own_templates() - before - {pid}) == 1
    assert load(client, source=str(models_root / "llama"))["state"] == "ready"


def test_a_first_start_that_failed_is_retried(
    make_client: ClientFactory, models_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "fail-once"
    marker.touch()
    monkeypatch.syspath_prepend(str(FAILING_START))  # the template's PYTHONPATH
    monkeypatch.setenv("BH_TEST_FAIL_ONCE", str(marker))
    client = make_client(loader_template="")
    until(lambda: _ready(client), "/readyz says starting for ever after a failed start", 120)
    assert not marker.exists()  # the first start did fail
    assert load(client, source=str(models_root / "llama"))["state"] == "ready"


@pytest.fixture
def gone() -> Iterator[Path]:
    """Where a shared template should be, in a folder of this user's: nothing there yet."""
    folder = Path(tempfile.mkdtemp(prefix="bh-gone-"))
    yield folder / "template.sock"
    shutil.rmtree(folder, ignore_errors=True)


def test_a_shared_template_that_is_gone_answers_loader_unavailable_until_it_is_back(
    make_client: ClientFactory, models_root: Path, gone: Path
) -> None:
    client = make_client(loader_template=str(gone))

    def unavailable() -> bool:
        answer = client.get("/readyz")
        return answer.status_code == 503 and answer.json()["code"] == "loader_unavailable"

    until(unavailable, "/readyz does not say the shared template is gone", 10)
    posted = client.post("/v1/models", json={"source": str(models_root / "llama")})
    assert posted.status_code == 202, posted.text
    error = wait_for(client, posted.json()["id"], ("failed",), timeout=30)["error"]
    assert error["code"] == "loader_unavailable"  # not internal
    assert "BASEHOLD_LOADER_TEMPLATE" in error["message"]
    estimated = client.post("/v1/estimate", json={"source": str(models_root / "llama")})
    assert estimated.status_code == 503 and estimated.json()["code"] == "loader_unavailable"
    back = start_template(gone)  # forked from the worker zygote: up in about a second
    try:
        until(lambda: _ready(client), "/readyz did not follow the template coming back", 120)
        assert load(client, source=str(models_root / "llama"))["state"] == "ready"
    finally:
        back.close()
