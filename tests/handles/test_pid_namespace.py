"""A model whose weights are lent as device segments (legacy CUDA IPC on a GPU; the host
stand-in here) is refused to a worker in another PID namespace, with a reason that says
what to do; the same lease from a visible pid gets its arena."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.handles.fdpass import Peer
from service.settings import Settings
from tests.conftest import app_of, load
from tests.handles.host_segments import HostSegments


def test_a_gpu_lease_from_another_pid_namespace_is_refused(
    models_root: Path, tmp_path: Path, socket_path: Path
) -> None:
    settings = Settings(state_dir=tmp_path / "state", socket=socket_path, model_roots=[models_root])
    app = create_app(settings, segments=HostSegments())
    with TestClient(app, base_url="http://localhost") as client:
        status = load(client, source=str(models_root / "llama"), dtype="float32")
        grant = client.post(
            f"/v1/models/{status['id']}/leases", json={"holder": "w", "ttl_seconds": 30}
        ).json()
        assert grant["handle"]["segments"], "the stand-in placed it in device segments"
        lending = app_of(client).state.lending
        with pytest.raises(Exception) as refused:
            lending.arena_fd(grant["lease_id"], grant["secret"], Peer(0, 1000, 1000))
        assert getattr(refused.value, "code", None) == "pid_namespace_unsupported"
        assert "shareProcessNamespace" in str(refused.value)
        fd = lending.arena_fd(grant["lease_id"], grant["secret"], Peer(4242, 1000, 1000))
        os.close(fd)
