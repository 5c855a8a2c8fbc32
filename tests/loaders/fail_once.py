"""Imported by a loader template a test starts (BASEHOLD_LOADER_PRELOAD): while the file
named by BH_TEST_FAIL_ONCE exists, importing this fails the template's start (and removes
the file), so the first start fails and the next one succeeds."""

from __future__ import annotations

import os

_marker = os.environ.get("BH_TEST_FAIL_ONCE")
if _marker and os.path.exists(_marker):
    os.unlink(_marker)
    raise RuntimeError("this loader template start fails on purpose (tests.loaders.fail_once)")
