"""The loader template builds transformers' lazily built caches before it forks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.loader.imports import FIRST

ROOT = Path(__file__).resolve().parents[2]


def test_importing_warm_builds_the_conversion_table() -> None:
    code = (
        "import transformers.conversion_mapping as c\n"
        "assert c._checkpoint_conversion_mapping_cache is None, 'built already'\n"
        "import service.loader.warm\n"
        "assert c._checkpoint_conversion_mapping_cache, 'not built'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_the_template_builds_it_before_it_serves() -> None:
    assert "service.loader.warm" in FIRST
