"""Templates never initialize CUDA before they fork (issue 26): on a GPU machine a loader or
worker forked from a process that did fails its first CUDA call ("Cannot re-initialize
CUDA in forked subprocess").

Rehearsed on the CPU with a torch that believes it has a GPU (tests/loader/cuda_believer:
CUDA available, one device, and any CUDA initialization marks this process initialized
and raises). Each process runs the real preload lists: the loader template
(`service.loader.forker`), the tests' worker template (`tests.zygote`) and gpu_check's
(`WORKER_PRELOAD`). BH_TEST_CUDA_LOG collects every CUDA initialization, with its pid."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from service.common.load.progress import Progress
from service.common.load.spec import LoadRequest
from service.loader import imports
from service.serving.loaders import template
from service.serving.loaders.loaders import Loaders, LoaderSetup
from tests.conftest import ClientFactory, load, until
from tests.zygote import ROOT, Zygote

BELIEVER = Path(__file__).with_name("cuda_believer")
NF4 = {"method": "bnb-4bit", "quant_type": "nf4", "compute_dtype": "float32"}


def _initializations(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def _line(stream: IO[bytes], timeout: float = 120) -> str:
    """The next line a process says, within `timeout` seconds."""
    said = b""
    deadline = time.monotonic() + timeout
    while not said.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([stream], [], [], left)[0], f"said only {said!r}"
        chunk = os.read(stream.fileno(), 1)
        assert chunk, f"it exited after {said!r}"
        said += chunk
    return said.decode().strip()


GPT2 = "transformers.models.gpt2.modeling_gpt2"  # in imports.LATER


@contextmanager
def cuda_on_import(
    tmp_path: Path, module: str = GPT2
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """A template (GPU-believing torch) whose import of `module` initializes CUDA: the
    process, its socket and its log; its stdin is closed (it exits) at the end."""
    log = tmp_path / "cuda-initializations.jsonl"
    folder = tmp_path / "template"
    folder.mkdir(mode=0o700)
    address = folder / "t.sock"
    env = _believing_env(log, BH_TEST_CUDA_ON_IMPORT=module)
    stderr = tmp_path / "template.log"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.loader.forker", "--listen", str(address), "--owned"],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        yield process, address, stderr
    finally:
        process.communicate(timeout=60)  # closes its stdin: an owned one exits


def _believing_env(log: Path, **extra: str) -> dict[str, str]:
    """A process environment where torch believes in a GPU (and records CUDA's
    initializations in `log`)."""
    path = os.pathsep.join([str(BELIEVER), str(ROOT)])
    return {**os.environ, "PYTHONPATH": path, "BH_TEST_CUDA_LOG": str(log), **extra}


@pytest.fixture
def believing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Processes this test starts with its sys.path as PYTHONPATH (a loader template)
    believe in a GPU; returns the log of their CUDA initializations."""
    log = tmp_path / "cuda-initializations.jsonl"
    monkeypatch.syspath_prepend(str(BELIEVER))
    monkeypatch.setenv("BH_TEST_CUDA_LOG", str(log))
    return log


def test_the_loader_template_stays_cuda_free_and_its_loader_imports_bitsandbytes(
    believing: Path, make_client: ClientFactory, models_root: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "template"
    folder.mkdir(mode=0o700)
    with (tmp_path / "template.log").open("wb") as stderr:
        process = template.start(folder / "t.sock", owned=True, log=stderr)
    try:
        assert _environ(process.pid)["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
        client = make_client(loader_template=str(folder / "t.sock"))
        body = load(client, source=str(models_root / "llama"), device_map="cpu", quantization=NF4)
        assert body["state"] == "ready", body
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)
    seen = _initializations(believing)
    assert not [s for s in seen if s["pid"] == process.pid], f"the template initialized: {seen}"
    # The loader (a child of the template) imported bitsandbytes, which asked for the GPU's
    # capability: CUDA would have initialized there, after the fork, where it works.
    in_loaders = [s for s in seen if s["ppid"] == process.pid and not s["forked_from"]]
    assert any("bitsandbytes/cuda_specs.py" in frame for s in in_loaders for frame in s["stack"])


def test_a_module_of_basehold_s_own_list_that_initializes_cuda_is_left_to_the_loaders(
    tmp_path: Path,
) -> None:
    """Should one of basehold's own preloads initialize CUDA on some machine (a library
    version, a GPU), the template starts again without it and serves: a first GPU run
    never fails on the preload list."""
    with cuda_on_import(tmp_path, "transformers.masking_utils") as (process, address, stderr):
        assert process.stdout is not None
        assert _line(process.stdout) == "ready"  # not `refused: ...`
        assert address.exists()
        again = _environ(process.pid)  # the same process, started again (exec)
        skipped = again["BASEHOLD_LOADER_PRELOAD_SKIP"].split(",")
        # It and what follows it (model code that imports it), once: one start again.
        assert skipped[0] == "transformers.masking_utils", skipped
        assert "transformers.modeling_utils" not in skipped, skipped
    err = stderr.read_text()
    assert "starting again without preloading it" in err, err[-3000:]
    log = tmp_path / "cuda-initializations.jsonl"
    assert [s["pid"] for s in _initializations(log)] == [process.pid]  # the first start only


def test_a_module_of_basehold_s_own_list_that_initializes_cuda_in_the_background_too(
    tmp_path: Path,
) -> None:
    """The same for a module the template imports once it serves (imports.LATER): it forks
    no more, and starts again (exec) without it, on the same socket; the new image serves,
    and finishes its own background preload."""
    assert GPT2 in imports.LATER
    with cuda_on_import(tmp_path) as (process, address, stderr):
        assert process.stdout is not None
        assert _line(process.stdout) == "ready"  # before its background preload
        # It finds the module initialized CUDA, and starts again (exec) without it.
        assert _line(process.stdout) == "ready", stderr.read_text()[-3000:]
        skipped = _environ(process.pid)["BASEHOLD_LOADER_PRELOAD_SKIP"].split(",")
        assert skipped[0] == GPT2, skipped
        assert "transformers.models.llama.modeling_llama" not in skipped, skipped
        template.connect(str(address), 30).close()  # the same socket serves
        until(
            lambda: "preloaded in the background" in stderr.read_text(),
            "the template started again never finished its background preload",
            120,
        )
    text = stderr.read_text()
    assert "starting again without preloading it" in text, text[-3000:]
    log = tmp_path / "cuda-initializations.jsonl"
    assert [s["pid"] for s in _initializations(log)] == [process.pid]  # before the exec only


def test_the_service_shows_why_its_template_refused(
    believing: Path, monkeypatch: pytest.MonkeyPatch, make_client: ClientFactory
) -> None:
    monkeypatch.setenv("BASEHOLD_LOADER_PRELOAD", "bitsandbytes")
    client = make_client(loader_template="")  # the service starts its own (template.start)

    def refused() -> bool:
        answer = client.get("/readyz")
        return answer.status_code == 503 and "importing bitsandbytes" in answer.json()["detail"]

    until(refused, "/readyz never said why the template refused", 300)
    problem = client.get("/readyz").json()
    assert problem["code"] == "loader_unavailable"
    # It said why (after `ready`: bitsandbytes is imported once the template serves; its
    # next start imports everything before it serves, and says why instead of `ready`),
    # naming the module and what to change.
    assert "importing bitsandbytes initialized CUDA" in problem["detail"], problem
    assert "remove it from BASEHOLD_LOADER_PRELOAD" in problem["detail"], problem
    assert _initializations(believing)  # the fake saw it


def test_the_tests_worker_template_stays_cuda_free_and_its_worker_imports_bitsandbytes(
    tmp_path: Path,
) -> None:
    log = tmp_path / "cuda-initializations.jsonl"
    env = _believing_env(log)
    workers = Zygote("worker", env)
    try:
        worker = workers.run_module(str(BELIEVER / "forked_worker.py"), [], env, ROOT)
        assert worker is not None, f"the worker template refused to fork: {_initializations(log)}"
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-3000:]
        assert workers._proc is not None
        template_pid = workers._proc.pid
        assert _environ(template_pid)["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    finally:
        workers.close()
    # The worker (forked from the template) initialized CUDA as its own: not refused as a
    # re-initialization in a fork, and the template never did.
    assert json.loads(out.splitlines()[-1]) == {"initialized": True}
    seen = _initializations(log)
    assert seen and all(s["pid"] == worker.pid and not s["forked_from"] for s in seen), seen


# In a GPU-believing process: load gpu_check (with bench/ on sys.path, as it runs), import
# its WORKER_PRELOAD as its forkserver does, then bitsandbytes (the fake sees that one).
_GPU_CHECK_PRELOAD = """
import importlib.util, json, sys
import torch
from service.loader.imports import CudaInitialized, cuda_initialized, import_before_fork
assert torch.cuda.is_available() and torch.cuda.device_count() == 1  # the believer works
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1] + "/gpu_check.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
try:
    result = {"missing": import_before_fork(list(module.WORKER_PRELOAD))}
except CudaInitialized as exc:
    result = {"initialized_by": exc.module}
import bitsandbytes
result["bitsandbytes_initializes"] = cuda_initialized()
print(json.dumps(result))
"""


def test_gpu_checks_worker_template_stays_cuda_free(tmp_path: Path) -> None:
    log = tmp_path / "cuda-initializations.jsonl"
    ran = subprocess.run(
        [sys.executable, "-c", _GPU_CHECK_PRELOAD, str(ROOT / "bench")],
        cwd=ROOT,
        env=_believing_env(log),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.splitlines()[-1])
    assert result == {"missing": [], "bitsandbytes_initializes": True}, result


def test_loaders_forked_before_the_template_starts_again_are_still_followed(
    tmp_path: Path, models_root: Path
) -> None:
    """A loader forked before a background module initialized CUDA outlives the template's
    start again (exec, same pid): the new image adopts it, so the load goes on and its exit
    is still reported to the service."""
    with cuda_on_import(tmp_path) as (process, address, stderr):
        loaders = Loaders(
            LoaderSetup(
                roots=[models_root],
                offload_root=tmp_path / "offload",
                socket=tmp_path / "ours.sock",
                cuda=None,
                template=str(address),
            )
        )
        try:
            assert process.stdout is not None
            assert _line(process.stdout) == "ready"
            spec = LoadRequest(source=str(models_root / "llama"), device_map="cpu")
            # Priced, it waits for `go`: alive while the template starts again.
            loader, _ = loaders.prepare("llama", "llama.adopted", spec, None)
            assert _line(process.stdout) == "ready", stderr.read_text()[-3000:]  # new image
            assert loader.wait(0) is None  # still running
            assert loaders.go(loader)
            held = loaders.drive(loader, Progress(), lambda estimate: None)
            assert held.placed.shareable
            assert loader.wait(60) == 0  # its exit, reported by the new image
            loaders.discard("llama.adopted")
            again, _ = loaders.prepare("llama", "llama.after", spec, None)  # it still forks
            assert loaders.go(again)
            assert loaders.drive(again, Progress(), lambda estimate: None).placed.shareable
            assert again.wait(60) == 0
            loaders.discard("llama.after")
        finally:
            loaders.close()
    assert "starting again without preloading it" in stderr.read_text()
