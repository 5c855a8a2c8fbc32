"""Run `basehold serve` under an address-space limit a little above what it needs idle,
so a big load really runs out of memory (used by the out_of_memory e2e test)."""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch  # noqa: F401 - import the heavy libraries before measuring
import transformers  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401

import service.app  # noqa: F401
from service.cli import main

if __name__ == "__main__":
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmSize:\s+(\d+) kB", status)
    assert match is not None
    limit = int(match.group(1)) * 1024 + int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.exit(main(sys.argv[2:]))
