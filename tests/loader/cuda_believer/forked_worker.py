"""Run in a worker forked from the tests' worker template (tests/loader/test_fork_safe.py):
import what workers import after the fork, and say whether CUDA initialized here (the
fake's log says whether it was refused as a re-initialization in a fork)."""

from __future__ import annotations

import json

import bitsandbytes  # noqa: F401
import peft  # noqa: F401
import torch

print(json.dumps({"initialized": torch.cuda.is_initialized()}))
