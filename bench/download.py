"""Hub download throughput: `curl` fetching a snapshot's files from the local stand-in hub
(tests/hub.py, real HTTP on 127.0.0.1, the Hub's redirect to a second "CDN" origin) next
to basehold fetching the same files in the same run: its downloader in-process (what a
loader runs: commit, file list, disk check, huggingface_hub's parallel download) and a
load through `basehold serve` (POST until the phase leaves `downloading`, which also
includes admission's metadata reads). Each run starts from an empty HF cache.

    .venv/bin/python bench/download.py [--params-m 250] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from common import launch, workspace

from service.loading import hub as downloader
from service.loading.progress import Progress
from service.loading.sources import HubOptions, HubSource
from tests.hub import LocalHub

REPO = "bench/llama"


def _curl(hub: LocalHub, into: Path) -> None:
    repo = hub.repos[REPO]
    args = ["curl", "-sSfL"]
    for name in repo.files:
        url = f"{hub.url}/{REPO}/resolve/{repo.commit}/{name}"
        args += [url, "-o", str(into / name)]
    subprocess.run(args, check=True)


def _in_process(hub: LocalHub, cache: Path) -> None:
    os.environ["HF_HUB_CACHE"] = str(cache)
    options = HubOptions(endpoint=hub.url)
    plan = downloader.plan(HubSource(REPO, "main"), None, options)
    downloader.check_disk(plan)
    downloader.download(plan, None, options, Progress())


def _served(hub: LocalHub, work: Path, cache: Path) -> float:
    env = {"BASEHOLD_HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache)}
    shutil.rmtree(work / "state", ignore_errors=True)
    served = launch(work, env=env)
    try:
        started = time.perf_counter()
        response = served.http.post("/v1/models", json={"source": REPO, "dtype": "float32"})
        model_id = response.json()["id"]
        while True:
            status = served.http.get(f"/v1/models/{model_id}").json()
            phase = status["progress"]["phase"]
            if status["state"] == "failed":
                raise RuntimeError(status["error"])
            if status["state"] == "ready" or phase not in ("resolving", "downloading"):
                return time.perf_counter() - started
            time.sleep(0.01)
    finally:
        served.stop()


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params-m", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    work, checkpoint = workspace(args.params_m)
    times: dict[str, list[float]] = {"curl": [], "downloader": [], "serve": []}
    try:
        with LocalHub() as hub:
            hub.add(REPO, checkpoint)
            size = sum(f.size for f in hub.repos[REPO].files.values())
            for run in range(args.repeat):
                fresh = work / f"run-{run}"
                for name in ("curl", "cache-a", "cache-b"):
                    (fresh / name).mkdir(parents=True)
                times["curl"].append(_timed(lambda: _curl(hub, fresh / "curl")))  # noqa: B023
                times["downloader"].append(
                    _timed(lambda: _in_process(hub, fresh / "cache-a"))  # noqa: B023
                )
                times["serve"].append(_served(hub, work, fresh / "cache-b"))
                shutil.rmtree(fresh)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["curl"])
    print(f"{size / 1e6:.0f} MB in {len(hub.repos[REPO].files)} files, median of {args.repeat}")
    print("| path | seconds | MB/s | time vs curl |")
    print("|---|---|---|---|")
    for name, label in (
        ("curl", "curl (sequential, one process)"),
        ("downloader", "basehold downloader (in-process)"),
        ("serve", "basehold serve: POST → past downloading"),
    ):
        seconds = statistics.median(times[name])
        print(f"| {label} | {seconds:.2f} | {size / 1e6 / seconds:.0f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
