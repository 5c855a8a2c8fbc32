"""deploy/monitoring/: the alerting rules are valid, their promtool unit tests pass, every
metric they read is one a real basehold exports, and every query of the Grafana dashboard
runs on a real Prometheus scraping a real basehold and finds data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml
from fastapi.testclient import TestClient

from tests.conftest import TERMINAL, ClientFactory, load, until
from tests.serving.test_server_e2e import Server, free_port

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"


def _promtool(*args: str) -> str:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (.ci/run does)"
    result = subprocess.run(
        [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    assert "SUCCESS: 7 rules found" in _promtool("check", "rules", "rules.yaml")
    assert "SUCCESS" in _promtool("test", "rules", "rules.test.yaml")


def test_every_metric_the_rules_read_is_exported(client: TestClient) -> None:
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    expressions = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    used = set(re.findall(r"\bbasehold_[a-z_]+", expressions))
    exported = set(re.findall(r"^# TYPE (basehold_[a-z_]+)", client.get("/metrics").text, re.M))
    # Counters are exported as NAME_total; a TYPE line names them without the suffix.
    exported |= {f"{name}_total" for name in exported}
    assert used and used <= exported, used - exported


def test_the_alerting_metrics_move(make_client: ClientFactory, models_root: Path) -> None:
    client = make_client(lease_reap_seconds=0.1)
    status = load(client, source=str(models_root / "gpt2"), dtype="float32")
    grant = client.post(f"/v1/models/{status['id']}/leases", json={"holder": "w", "ttl_seconds": 1})
    assert grant.status_code == 201
    until(lambda: not client.get("/v1/leases").json()["leases"], "the lease never expired", 30)
    text = client.get("/metrics").text
    assert "basehold_leases_expired_total 1.0" in text
    assert "basehold_oldest_load_seconds 0.0" in text
    total = re.search(r"^basehold_host_memory_total_bytes (\S+)", text, re.M)
    available = re.search(r"^basehold_host_memory_available_bytes (\S+)", text, re.M)
    assert total and available and 0 < float(available.group(1)) < float(total.group(1))


GPU_ONLY = ("basehold_gpu_memory_",)  # no GPU here: NVML exports nothing to plot


def _prometheus(tmp_path: Path, target: str, port: int) -> subprocess.Popen[bytes]:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: apt-get install prometheus (.ci/run does)"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                # Three scrapes (what the test waits for) in 1.5 s.
                "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
                "scrape_configs": [
                    {"job_name": "basehold", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    return subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_every_dashboard_query_runs_against_a_real_prometheus_scraping_basehold(
    live_server: Server, models_root: Path, tmp_path: Path
) -> None:
    board = json.loads((MONITORING / "dashboard.json").read_text())
    queries = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    assert len(queries) >= 12
    http = httpx.Client(base_url=live_server.url, timeout=60)
    ok = http.post("/v1/models", json={"source": str(models_root / "gpt2"), "dtype": "float32"})
    bad = http.post("/v1/models", json={"source": str(models_root / "llama"), "task": "seq2seq-lm"})
    for response in (ok, bad):
        model_id = response.json()["id"]

        def settled(model_id: str = model_id) -> bool:
            return http.get(f"/v1/models/{model_id}").json()["state"] in TERMINAL

        until(settled, "settled")
    port = free_port()
    server = _prometheus(tmp_path, live_server.url.removeprefix("http://"), port)
    origin = f"http://127.0.0.1:{port}"
    api = f"{origin}/api/v1/query"

    def query(expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(api, params={"query": expr}, timeout=30).json()
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def ready() -> bool:
        # Prometheus answers its API with a plain-text 503 until its TSDB is open.
        try:
            return httpx.get(f"{origin}/-/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def scraped_thrice() -> bool:
        return bool(query('count_over_time(up{job="basehold"}[1m]) >= 3'))

    try:
        until(ready, "Prometheus ready", 60)
        until(scraped_thrice, "Prometheus scraped basehold three times", 60)
        for expr in queries:
            result = query(expr)
            if not any(name in expr for name in GPU_ONLY):
                assert result, f"{expr} has no data from a real basehold"
    finally:
        server.terminate()
        server.wait(timeout=30)
