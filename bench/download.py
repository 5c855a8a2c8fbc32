"""Hub download throughput: `curl` fetching a snapshot's files from the local stand-in hub
(tests/hub.py in a process of its own, real HTTP on 127.0.0.1, the Hub's redirect to a
second "CDN" origin) next
to basehold fetching the same files in the same run: its downloader in-process (what a
loader runs: commit, file list, disk check, huggingface_hub's parallel download; and
huggingface_hub's `snapshot_download` alone, as a training job calls it) and a
load through `basehold serve` (POST until the phase leaves `downloading`, which also
includes admission's metadata reads). Each run starts from an empty HF cache.

    .venv/bin/python bench/download.py [--params-m 250] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common import discard, launch, workspace

from service.common.load.progress import Progress
from service.common.load.sources import HubOptions, HubSource
from service.loader import hub as downloader
from tests.hub import LocalHub

REPO = "bench/llama"


@dataclass(frozen=True)
class Hub:
    url: str
    commit: str
    files: dict[str, int]  # name → size


def _serve(checkpoint: Path, answer: multiprocessing.Queue[Hub]) -> None:
    hub = LocalHub().start()
    repo = hub.add(REPO, checkpoint)
    answer.put(Hub(hub.url, repo.commit, {f.name: f.size for f in repo.files.values()}))
    threading.Event().wait()  # serves until the bench terminates this process


@contextmanager
def _hub_process(checkpoint: Path) -> Iterator[Hub]:
    """The stand-in hub in a process of its own (it never shares a GIL with a client)."""
    context = multiprocessing.get_context("fork")
    answer: multiprocessing.Queue[Hub] = context.Queue()
    process = context.Process(target=_serve, args=(checkpoint, answer), daemon=True)
    process.start()
    try:
        yield answer.get(timeout=120)
    finally:
        process.terminate()
        process.join()


def _curl(hub: Hub, into: Path) -> None:
    args = ["curl", "-sSfL"]
    for name in hub.files:
        url = f"{hub.url}/{REPO}/resolve/{hub.commit}/{name}"
        args += [url, "-o", str(into / name)]
    subprocess.run(args, check=True)


def _in_process(hub: Hub, cache: Path) -> None:
    os.environ["HF_HUB_CACHE"] = str(cache)
    options = HubOptions(endpoint=hub.url)
    plan = downloader.plan(HubSource(REPO, "main"), None, options)
    downloader.check_disk(plan)
    downloader.download(plan, None, options, Progress())


def _plain(hub: Hub, cache: Path) -> None:
    """huggingface_hub alone, as a training job would call it."""
    from huggingface_hub import snapshot_download

    snapshot_download(REPO, cache_dir=cache, endpoint=hub.url)


def _served(hub: Hub, work: Path, cache: Path) -> float:
    env = {"BASEHOLD_HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache)}
    shutil.rmtree(work / "state", ignore_errors=True)
    served = launch(work, env=env)
    try:
        started = time.perf_counter()
        response = served.http.post("/v1/models", json={"source": REPO, "dtype": "float32"})
        model_id = response.json()["id"]
        while time.perf_counter() - started < 600:
            status = served.http.get(f"/v1/models/{model_id}").json()
            phase = status["progress"]["phase"]
            if status["state"] == "failed":
                raise RuntimeError(status["error"])
            if status["state"] == "ready" or phase not in ("resolving", "downloading"):
                return time.perf_counter() - started
            time.sleep(0.01)
        raise TimeoutError(f"{model_id} was still downloading after 600 s")
    finally:
        served.stop()


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


PATHS = {
    "curl": "curl (sequential, one process)",
    "plain": "huggingface_hub snapshot_download alone",
    "downloader": "basehold downloader (in-process)",
    "serve": "basehold serve: POST → past downloading",
}


def _measure(name: str, hub: Hub, work: Path, into: Path) -> float:
    into.mkdir(parents=True)
    try:
        if name == "serve":
            return _served(hub, work, into)
        run = {"curl": _curl, "plain": _plain, "downloader": _in_process}[name]
        return _timed(lambda: run(hub, into))
    finally:
        shutil.rmtree(into)
        os.sync()  # the next path does not pay for this one's writeback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params-m", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    work, checkpoint = workspace(args.params_m)
    names = list(PATHS)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        with _hub_process(checkpoint) as hub:
            size = sum(hub.files.values())
            for run in range(args.repeat):
                for name in names[run % len(names) :] + names[: run % len(names)]:  # rotated
                    times[name].append(_measure(name, hub, work, work / f"{name}-{run}"))
    finally:
        discard(work)
    base = statistics.median(times["curl"])
    print(f"{size / 1e6:.0f} MB in {len(hub.files)} files, median of {args.repeat}")
    print("| path | seconds | MB/s | time vs curl |")
    print("|---|---|---|---|")
    for name, label in PATHS.items():
        seconds = statistics.median(times[name])
        print(f"| {label} | {seconds:.2f} | {size / 1e6 / seconds:.0f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
