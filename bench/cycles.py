"""Leak check: N load/unload cycles through the HTTP API; the server's RSS and the shared
memory its processes hold (where the sealed arenas live; nobody else's on the machine)
before and after (and the peak while a model is held).

    .venv/bin/python bench/cycles.py [--cycles 50] [--params-m 100]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from common import server, smaps, wait_ready, workspace

from tests.shared_memory import held_shared_memory

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--params-m", type=int, default=100)
    args = parser.parse_args()
    work, source = workspace(args.params_m)
    specs: list[dict[str, Any]] = [
        {"dtype": "float32"},
        {"dtype": "float32", "quantization": {"method": "bnb-4bit"}},
    ]
    with server(work) as served:
        http, pid = served.http, served.pid
        # One warm-up cycle per spec: first use of code paths allocates for good.
        for spec in specs:
            model_id = http.post("/v1/models", json={"source": str(source), **spec}).json()["id"]
            wait_ready(http, model_id)
            http.delete(f"/v1/models/{model_id}")
        rss0, shm0 = smaps(pid)["Rss"], held_shared_memory(pid)
        peak_rss, peak_shm = rss0, shm0
        start = time.perf_counter()
        for cycle in range(args.cycles):
            spec = specs[cycle % len(specs)]
            model_id = http.post("/v1/models", json={"source": str(source), **spec}).json()["id"]
            wait_ready(http, model_id, poll=0.02)
            peak_shm = max(peak_shm, held_shared_memory(pid))
            peak_rss = max(peak_rss, smaps(pid)["Rss"])
            assert http.delete(f"/v1/models/{model_id}").status_code == 204
        elapsed = time.perf_counter() - start
        rss1, shm1 = smaps(pid)["Rss"], held_shared_memory(pid)
    print(
        f"\nbasehold cycles bench: {args.cycles} load/unload cycles of a ~{args.params_m}M "
        f"Llama (fp32 and nf4 alternating), {elapsed:.0f}s\n"
    )
    print("| | before (MiB) | peak while held (MiB) | after (MiB) | after - before (MiB) |")
    print("|---|---|---|---|---|")
    print(
        f"| server RSS | {rss0 / MiB:.0f} | {peak_rss / MiB:.0f} | {rss1 / MiB:.0f} | "
        f"{(rss1 - rss0) / MiB:+.1f} |"
    )
    print(
        f"| shared (arenas) | {shm0 / MiB:.0f} | {peak_shm / MiB:.0f} | {shm1 / MiB:.0f} | "
        f"{(shm1 - shm0) / MiB:+.1f} |"
    )


if __name__ == "__main__":
    main()
