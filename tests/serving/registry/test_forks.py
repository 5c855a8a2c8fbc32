"""What a POST costs in processes: a new load is one loader process (it prices itself,
then loads), a spec that is held already none (answered from the registry; shown with the
loader template gone, where any fork would fail)."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.common.protocol.job import Job
from service.common.protocol.messages import Kind
from service.serving.loaders.keeper import Template
from tests.conftest import ClientFactory, load, until, wait_for
from tests.serving.loaders.templates import start_template


def _template_gone(client: TestClient) -> bool:
    answer = client.get("/readyz")
    return answer.status_code == 503 and answer.json()["code"] == "loader_unavailable"


def test_a_held_spec_is_answered_without_a_loader(
    make_client: ClientFactory, models_root: Path
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bh-held-"))
    template = start_template(folder / "template.sock")
    try:
        client = make_client(loader_template=str(folder / "template.sock"))
        spec: dict[str, Any] = {"source": str(models_root / "gpt2"), "dtype": "float32"}
        held = load(client, **spec)
        assert held["state"] == "ready", held
        template.close()
        until(lambda: _template_gone(client), "/readyz does not say the template is gone", 30)

        again = client.post("/v1/models", json=spec)
        assert again.status_code == 200, again.text
        assert again.json()["id"] == held["id"] and again.json()["state"] == "ready"
        named = client.post("/v1/models", json={**spec, "name": "gpt2-base"})  # an alias
        assert named.status_code == 200, named.text
        assert client.get("/v1/models/gpt2-base").json()["id"] == held["id"]

        # Anything that does need a process fails: the template really is gone.
        other = client.post("/v1/models", json={**spec, "dtype": "float16"})
        assert other.status_code == 202, other.text
        failed = wait_for(client, other.json()["id"], ("failed",), timeout=30)
        assert failed["error"]["code"] == "loader_unavailable"
    finally:
        template.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_new_load_is_one_loader_process(
    make_client: ClientFactory, models_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forked: list[Kind] = []
    spawn = Template.spawn

    def counted(self: Template, kind: Kind, job: Job, channel: socket.socket) -> Any:
        forked.append(kind)
        return spawn(self, kind, job, channel)

    monkeypatch.setattr(Template, "spawn", counted)
    client = make_client()
    assert load(client, source=str(models_root / "gpt2"), dtype="float32")["state"] == "ready"
    assert forked == ["load"]  # priced and loaded by the same process
    estimated = client.post("/v1/estimate", json={"source": str(models_root / "gpt2")})
    assert estimated.status_code == 200 and forked == ["load", "estimate"]
