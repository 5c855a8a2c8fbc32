"""deploy/monitoring/: the alerting rules are valid, their promtool unit tests pass, and
every metric they read is one a real basehold exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from tests.conftest import ClientFactory, load, until

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
    assert "SUCCESS: 6 rules found" in _promtool("check", "rules", "rules.yaml")
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
