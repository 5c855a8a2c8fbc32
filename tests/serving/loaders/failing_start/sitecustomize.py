"""Makes the first start of a loader template fail, at once
(tests/serving/loaders/test_liveness.py).

A test puts this folder first on its sys.path, which a template it starts inherits as
PYTHONPATH (service.serving.loaders.template.start): every Python process started from
it then runs this at start-up. While the file named by BH_TEST_FAIL_ONCE exists, this removes it and
exits with code 1, before the template imported anything or said `ready`; so the first
start fails and the next one (no file now) runs as usual. Failing in the template's own
imports (after torch's ~6 s) is the same failure to the service, only slower."""

from __future__ import annotations

import os
import sys

_marker = os.environ.get("BH_TEST_FAIL_ONCE")
if _marker and os.path.exists(_marker):
    os.unlink(_marker)
    print(
        "this template start fails on purpose (tests/serving/loaders/failing_start)",
        file=sys.stderr,
    )
    sys.stderr.flush()
    os._exit(1)
