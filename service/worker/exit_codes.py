"""Worker side: the exit codes a training job ends with, for schedulers to tell apart.

A crash exits 1 (Python's uncaught exception). A lost lease is not a crash: the job saved
a resumable checkpoint and a rerun on a new lease continues from it, so it exits
`LEASE_LOST` (sysexits' EX_TEMPFAIL), which a Kubernetes Job's `podFailurePolicy` can
`Ignore` (retry without counting towards `backoffLimit`). A setting that must change
first (no tokenizer: an unwritable BASEHOLD_CACHE or HOME) exits `CONFIG` (EX_CONFIG):
retrying as is cannot help, so a policy can fail the Job at once. See docs/jobs.md.
"""

from __future__ import annotations

from typing import Final

LEASE_LOST: Final = 75  # EX_TEMPFAIL: checkpoint saved; retry on a new lease with --resume
CONFIG: Final = 78  # EX_CONFIG: fix a setting (named on stderr) before running again
