"""Property-based fuzzing of the whole served API with schemathesis, against a real server
holding real tiny checkpoints, with and without API keys. Passes when there is no
response >= 500, none that breaks the documented schema or content type, and every 4xx is
problem+json with a `code` (tests/serving/api/fuzz_checks.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serving.test_server_e2e import ROOT, start, wait_ready

pytestmark = pytest.mark.e2e
KEY = "fuzz-every-scope-key"
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"
# Bounded for CI: a few minutes for both servers together.
MAX_EXAMPLES = os.environ.get("BASEHOLD_FUZZ_EXAMPLES", "10")


def run_schemathesis(url: str, tmp_path: Path, headers: dict[str, str]) -> str:
    config = tmp_path / "schemathesis.toml"
    # An event stream never ends by itself: schemathesis reads it until its request
    # timeout (10 s by default; at 1 s its ~17 streams were still most of this test's
    # time). What it checks arrives at once (the status, the headers, the events replayed
    # from the buffer); the retries cover headers slower than that on a busy machine.
    config.write_text(
        '[parameters]\n"path.model_id" = "tiny"\n\n'
        '[[operations]]\ninclude-path = "/v1/events"\nrequest-timeout = 0.25\n'
        "request-retries = 3\n"
    )
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(config),
        "run",
        f"{url}/openapi.json",
        "--checks",
        f"{CHECKS},problem_json_with_code",
        "--max-examples",
        MAX_EXAMPLES,
        "--phases",
        "examples,coverage,fuzzing",
        "--workers",
        "1",
        "--seed",
        "20261128",
        "--suppress-health-check",
        "all",
        *[arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")],
    ]
    proc = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.serving.api.fuzz_checks", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    return output


@pytest.mark.parametrize("keys", [False, True], ids=["no-keys", "keys"])
def test_fuzz_every_route(tmp_path: Path, models_root: Path, keys: bool) -> None:
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)]),
        "HF_HUB_OFFLINE": "1",
        **({"BASEHOLD_API_KEYS": json.dumps({KEY: ["admin", "worker", "read"]})} if keys else {}),
    }
    headers = {"Authorization": f"Bearer {KEY}"} if keys else {}
    server = start(tmp_path, [], env=env)
    try:
        body = {"source": str(models_root / "llama"), "name": "tiny", "dtype": "float32"}
        httpx.post(f"{server.url}/v1/models", json=body, headers=headers)
        assert wait_ready(server.url, "tiny") if not keys else True
        output = run_schemathesis(server.url, tmp_path, headers)
        generated = re.search(r"(\d+) generated", output)
        assert generated and int(generated.group(1)) > 200, output[-3000:]
        print(output[output.rfind("SUMMARY") - 40 :])
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert "Traceback" not in server.output(), server.output()[-5000:]
    finally:
        server.stop()
