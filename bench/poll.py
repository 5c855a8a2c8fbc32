"""Dashboard polling under load: p50/p99 of GET /v1/memory and GET /v1/models with 32
concurrent pollers (each polls every --interval seconds, as dashboards do), idle vs while
a ~1 GB checkpoint loads (4-bit quantization of a ~250M-parameter fp32 Llama), as a ratio.
Same server, same run.

    .venv/bin/python bench/poll.py [--pollers 32] [--interval 0.25] [--idle-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import httpx
from common import server, workspace

PATHS = ("/v1/memory", "/v1/models")


async def poll(
    url: str, pollers: int, until: asyncio.Event, interval: float
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {path: [] for path in PATHS}
    limits = httpx.Limits(max_connections=pollers)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one(index: int) -> None:
            path = PATHS[index % len(PATHS)]
            await asyncio.sleep(interval * index / pollers)  # spread the pollers out
            while not until.is_set():
                start = time.perf_counter()
                response = await client.get(path)
                elapsed = time.perf_counter() - start
                samples[path].append(elapsed)
                assert response.status_code == 200
                await asyncio.sleep(max(0.0, interval - elapsed))

        await asyncio.gather(*(one(i) for i in range(pollers)))
    return samples


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 2 else 0.0


async def measure(
    url: str,
    pollers: int,
    idle_seconds: float,
    interval: float,
    http: httpx.Client,
    source: Path,
) -> tuple[dict[str, list[float]], dict[str, list[float]], float]:
    stop = asyncio.Event()
    task = asyncio.create_task(poll(url, pollers, stop, interval))
    await asyncio.sleep(idle_seconds)
    stop.set()
    idle = await task
    stop = asyncio.Event()
    body = {"source": str(source), "dtype": "float32", "quantization": {"method": "bnb-4bit"}}
    start = time.perf_counter()
    model_id = http.post("/v1/models", json=body).json()["id"]
    task = asyncio.create_task(poll(url, pollers, stop, interval))
    while (await asyncio.to_thread(http.get, f"/v1/models/{model_id}")).json()["state"] in (
        "queued",
        "loading",
    ):
        await asyncio.sleep(0.1)
    stop.set()
    loading = await task
    return idle, loading, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pollers", type=int, default=32)
    parser.add_argument("--idle-seconds", type=float, default=10)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--params-m", type=int, default=250)
    args = parser.parse_args()
    work, source = workspace(args.params_m)
    with server(work) as served:
        http = served.http
        idle, loading, load_s = asyncio.run(
            measure(
                str(http.base_url), args.pollers, args.idle_seconds, args.interval, http, source
            )
        )
    print(
        f"\nbasehold poll bench: {args.pollers} pollers every {args.interval}s; load of a "
        f"{source.joinpath('model.safetensors').stat().st_size / 2**30:.2f} GB checkpoint "
        f"(nf4) took {load_s:.1f}s\n"
    )
    print(
        "| endpoint | idle p50 (ms) | idle p99 (ms) | loading p50 (ms) | loading p99 (ms) "
        "| p99 ratio | requests idle / loading |"
    )
    print("|---|---|---|---|---|---|---|")
    for path in PATHS:
        i50, i99 = pct(idle[path], 50), pct(idle[path], 99)
        l50, l99 = pct(loading[path], 50), pct(loading[path], 99)
        print(
            f"| GET {path} | {i50:.1f} | {i99:.1f} | {l50:.1f} | {l99:.1f} | "
            f"{l99 / i99 if i99 else 0:.2f} | {len(idle[path])} / {len(loading[path])} |"
        )


if __name__ == "__main__":
    main()
