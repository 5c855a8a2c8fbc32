"""Start tests/handles/worker.py as an independent process (not a fork of anything)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def spawn_worker(
    url: str, model_id: str, mode: str, spec: dict[str, Any], *, quiet: bool = False
) -> subprocess.Popen[str]:
    """`quiet`: discard its output (storms start many)."""
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "tests.handles.worker", url, model_id, mode, json.dumps(spec)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=output,
        stderr=output,
        text=True,
    )
