"""`basehold serve` with the host stand-in for CUDA device segments (tests/common/handles/
host_segments.py), for rehearsing the GPU flow on a machine without one:

    python tests/worker/host_serve.py --port 8000

Everything but the CUDA calls runs as on a GPU node: models on the CPU are placed into
device segments, published, opened by independent workers and freed by their leases."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.common.logsafe import configure
from service.serving.app import create_app
from service.serving.server import serve
from service.serving.settings import Settings
from tests.common.handles.host_segments import HostSegments


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    configure(args.log_level.upper())
    app = create_app(Settings(), segments=HostSegments())
    serve(app, "127.0.0.1", args.port, args.log_level)


if __name__ == "__main__":
    main()
