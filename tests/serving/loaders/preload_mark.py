"""A module for BASEHOLD_LOADER_PRELOAD in tests of the template's background preload:
put last, its import tells (in the file BH_TEST_PRELOAD_LOG names) that the template
imported all of its preload."""

from __future__ import annotations

import os

with open(os.environ["BH_TEST_PRELOAD_LOG"], "a") as log:
    log.write(f"imported last in {os.getpid()}\n")
