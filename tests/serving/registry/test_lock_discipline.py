"""Nothing slow runs under the registry's lock: memory probes run before it is taken and
state database writes after it is let go (checked on every probe and every SQL write of
a real app's load, lease, renew, release and unload)."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.memory.nvml import GpuMemory
from service.serving.settings import Settings
from tests.conftest import load
from tests.serving.api.test_memory import FakeCuda


class WatchedNvml:
    """NVML stand-in that notes, on each probe, whether the calling thread holds `lock`."""

    def __init__(self) -> None:
        self.lock: threading.RLock | None = None
        self.held: list[bool] = []

    def gpus(self) -> list[GpuMemory]:
        if self.lock is not None:
            self.held.append(getattr(self.lock, "_is_owned")())  # noqa: B009 - RLock's own check
        return []


def test_probes_and_database_writes_run_outside_the_lock(
    tmp_path: Path, models_root: Path, socket_path: Path
) -> None:
    nvml = WatchedNvml()
    settings = Settings(state_dir=tmp_path / "state", socket=socket_path, model_roots=[models_root])
    app = create_app(settings, cuda=FakeCuda(0), gpus=nvml)
    with TestClient(app, base_url="http://localhost") as client:
        registry = app.state.registry
        lock = registry._lock._lock
        nvml.lock = lock
        writes: list[tuple[str, bool]] = []

        def traced(statement: str) -> None:
            if statement.split(" ", 1)[0].upper() in ("INSERT", "UPDATE", "DELETE", "COMMIT"):
                writes.append((statement[:40], lock._is_owned()))

        registry._persistence._db._conn.set_trace_callback(traced)
        model = load(client, source=str(models_root / "gpt2"), dtype="float32")
        assert model["state"] == "ready"
        grant = client.post(
            f"/v1/models/{model['id']}/leases", json={"holder": "w", "ttl_seconds": 60}
        ).json()
        secret = {"X-Lease-Secret": grant["secret"]}
        assert client.post(f"/v1/leases/{grant['lease_id']}/renew", headers=secret).is_success
        assert client.delete(f"/v1/leases/{grant['lease_id']}", headers=secret).is_success
        assert client.post("/v1/estimate", json={"source": str(models_root / "llama")}).is_success
        assert client.delete(f"/v1/models/{model['id']}").status_code in (202, 204)
    assert nvml.held and not any(nvml.held), "a memory probe ran under the registry lock"
    assert len(writes) >= 6
    assert [w for w in writes if w[1]] == [], "a database write ran under the registry lock"
