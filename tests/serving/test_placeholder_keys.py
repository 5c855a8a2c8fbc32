"""Settings refuses the env example's placeholder keys (docker/basehold.env.example), and
`basehold serve` stops on one line that says how to generate keys, naming no key."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from service.serving.settings import GENERATE_KEY, PLACEHOLDER_KEY_MARKS, Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docker" / "basehold.env.example"


def example_keys() -> dict[str, list[str]]:
    [line] = [x for x in EXAMPLE.read_text().splitlines() if x.startswith("BASEHOLD_API_KEYS=")]
    keys: dict[str, list[str]] = json.loads(line.split("=", 1)[1])
    return keys


def test_every_key_of_the_example_is_a_placeholder() -> None:
    keys = example_keys()
    assert keys and all("change-me" in key for key in keys)
    assert GENERATE_KEY in EXAMPLE.read_text()


@pytest.mark.parametrize("who", ["first", "last"])
def test_a_placeholder_key_is_refused_without_quoting_it(
    who: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = {secrets.token_urlsafe(24): ["admin"]}
    [(placeholder, scopes)] = list(example_keys().items())[-1:]
    keys = {placeholder: scopes, **real} if who == "first" else {**real, placeholder: scopes}
    monkeypatch.setenv("BASEHOLD_API_KEYS", json.dumps(keys))
    with pytest.raises(ValidationError) as raised:
        Settings(state_dir=tmp_path)
    message = str(raised.value)
    number = 1 if who == "first" else 2
    assert f"API key number {number} is a placeholder" in message and GENERATE_KEY in message
    assert placeholder not in message and next(iter(real)) not in message


def test_the_kubernetes_secret_examples_keys_are_placeholders_too(tmp_path: Path) -> None:
    secret = yaml.safe_load((ROOT / "deploy" / "examples" / "secret.example.yaml").read_text())
    keys = json.loads(secret["stringData"]["api-keys"])
    for key, scopes in keys.items():
        with pytest.raises(ValidationError, match='contains "replace-"'):
            Settings(state_dir=tmp_path, api_keys={key: scopes})


@pytest.mark.parametrize("mark", PLACEHOLDER_KEY_MARKS)
def test_a_mark_is_found_in_any_case(mark: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="is a placeholder"):
        Settings(state_dir=tmp_path, api_keys={f"my-{mark.upper()}key": ["worker"]})
    # Generated keys pass.
    key = secrets.token_urlsafe(24)
    assert Settings(state_dir=tmp_path, api_keys={key: ["ensure", "worker"]}).api_keys


def test_serve_stops_on_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BASEHOLD_API_KEYS": json.dumps(example_keys()),
        "BASEHOLD_STATE_DIR": str(tmp_path / "state"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.match(r"basehold: invalid settings: BASEHOLD_API_KEYS: .*placeholder", line), line
    assert GENERATE_KEY in line
    assert not any(key in line for key in example_keys())
    assert not (tmp_path / "state").exists()  # refused before anything was made
