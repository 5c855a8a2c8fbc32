"""Container HEALTHCHECK without curl: GET /healthz on the local port."""

import os
import sys
import urllib.request

port = os.environ.get("BASEHOLD_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
