"""A shared loader template (BASEHOLD_LOADER_TEMPLATE) is trusted only once checked: its
folder must be this user's alone, it must be served by this uid (SO_PEERCRED) and speak
this loader protocol. Otherwise the service refuses to start, and a load never sends a
job or a token to it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.common.private_dir import FolderUnsafe
from service.serving.app import create_app
from service.serving.settings import Settings
from tests.conftest import ClientFactory, wait_for

FAKE = Path(__file__).with_name("fake_template.py")
OTHER_UID = 54321
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to serve as another uid")


class Fake:
    def __init__(self, address: Path, record: Path, process: subprocess.Popen[str]) -> None:
        self.address, self.record, self.process = address, record, process

    def received(self) -> bytes:
        """Everything it was sent, with a <connect> per connection."""
        return self.record.read_bytes() if self.record.exists() else b""


FakeFactory = Callable[..., Fake]


@pytest.fixture
def folder() -> Iterator[Path]:
    """A short folder of this user's (AF_UNIX paths are limited to 107 bytes)."""
    made = Path(tempfile.mkdtemp(prefix="bh-trust-"))
    yield made
    shutil.rmtree(made, ignore_errors=True)


@pytest.fixture
def fake(folder: Path) -> Iterator[FakeFactory]:
    started: list[subprocess.Popen[str]] = []

    def start(uid: str = "-", answer: str = "echo") -> Fake:
        address, record = folder / "template.sock", folder / "record"
        command = [sys.executable, str(FAKE), str(address), str(record), uid, answer]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        return Fake(address, record, process)

    yield start
    for process in started:
        process.kill()
        process.wait()


def _settings(tmp_path: Path, models_root: Path, template: Path) -> Settings:
    return Settings(
        state_dir=tmp_path / "state",
        socket=Path(tempfile.mkdtemp(prefix="bh-s-")) / "s.sock",
        model_roots=[models_root],
        loader_template=str(template),
    )


def test_a_template_in_a_folder_others_can_write_is_refused_at_start(
    fake: FakeFactory, folder: Path, tmp_path: Path, models_root: Path
) -> None:
    template = fake()
    folder.chmod(0o770)
    with pytest.raises(FolderUnsafe, match="BASEHOLD_LOADER_TEMPLATE") as refused:
        create_app(_settings(tmp_path, models_root, template.address))
    assert "writable by others" in str(refused.value)
    assert template.received() == b""  # not even a connection


@as_root
def test_a_template_served_by_another_uid_is_refused_at_start(
    fake: FakeFactory, tmp_path: Path, models_root: Path
) -> None:
    template = fake(uid=str(OTHER_UID))
    with pytest.raises(FolderUnsafe, match=f"uid {OTHER_UID}") as refused:
        create_app(_settings(tmp_path, models_root, template.address))
    assert "BASEHOLD_LOADER_TEMPLATE" in str(refused.value)
    assert template.received() in (b"", b"<connect>")  # connected to, never sent a byte


@as_root
def test_a_load_never_sends_its_job_to_a_template_of_another_uid(
    fake: FakeFactory, folder: Path, make_client: ClientFactory, models_root: Path
) -> None:
    """Gone at start (so the service starts), then another uid serves the socket: loads
    fail loader_unavailable and it gets nothing, neither the job nor the token."""
    client = make_client(loader_template=str(folder / "template.sock"))
    template = fake(uid=str(OTHER_UID))
    token = {"X-HF-Token": "hf_s3cret"}
    posted = client.post("/v1/models", json={"source": str(models_root / "llama")}, headers=token)
    assert posted.status_code == 202, posted.text
    error = wait_for(client, posted.json()["id"], ("failed",), timeout=30)["error"]
    assert error["code"] == "loader_unavailable"
    assert f"uid {OTHER_UID}" in error["message"]
    estimated = client.post("/v1/estimate", json={"source": str(models_root / "llama")})
    assert estimated.status_code == 503 and estimated.json()["code"] == "loader_unavailable"
    assert b"hf_s3cret" not in template.received()
    assert template.received().replace(b"<connect>", b"") == b""


def test_a_template_of_another_protocol_version_is_refused_at_start(
    fake: FakeFactory, tmp_path: Path, models_root: Path
) -> None:
    template = fake(answer="999")
    with pytest.raises(FolderUnsafe, match="protocol 999") as refused:
        create_app(_settings(tmp_path, models_root, template.address))
    assert "restart the template" in str(refused.value).lower()
    received = template.received()
    assert b'"hello"' in received and b"spawn" not in received and b"job" not in received


def test_the_cli_refuses_to_start_with_an_untrusted_template(
    fake: FakeFactory, folder: Path, tmp_path: Path
) -> None:
    from tests.spawn import run_basehold

    template = fake()
    folder.chmod(0o770)
    env = {
        **os.environ,
        "BASEHOLD_STATE_DIR": str(tmp_path / "state"),
        "BASEHOLD_SOCKET": str(Path(tempfile.mkdtemp(prefix="bh-s-")) / "s.sock"),
        "BASEHOLD_LOADER_TEMPLATE": str(template.address),
    }
    result = run_basehold(["serve", "--port", "1"], env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr and "BASEHOLD_LOADER_TEMPLATE" in result.stderr
    assert template.received() == b""
