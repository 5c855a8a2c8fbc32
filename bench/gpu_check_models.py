"""gpu_check's model stages, against a real `basehold serve` (with the host stand-in for
device segments in a rehearsal): fp32/bf16/nf4/8-bit loads against `from_pretrained`,
the GPU peak while a load is placed, attach time, four workers' memory, a forced unload.

GPU memory is read device-wide (every process's) in this process, which holds a CUDA
context of its own throughout; what a stage attributes to the model is a difference
taken with no loader alive (READY comes before the loader exits: `wait_loaders_gone`)
and without the workers' own CUDA contexts (measured apart, or gone when measured).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ROOT, Served, launch, pretrained_kwargs, wait_ready
from gpu_check_runner import Deadline, Outcome, Skip
from gpu_check_segments import MiB, device_used
from gpu_check_worker import TOKENS, Worker, attach_model

HOST_SERVE = [sys.executable, str(ROOT / "tests" / "worker" / "host_serve.py")]
STAND_IN_FD = "/memfd:basehold-segment"
GRACE_S = 2.0  # BASEHOLD_SEGMENT_GRACE_SECONDS for the server: segments outlive a release
FORCED_TTL_S = 3  # the holding worker's lease


@dataclass
class Setup:
    where: str
    work: Path
    params_m: int
    tiny: bool
    steps: int
    served: Served | None = None
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.where.startswith("cuda")

    def url(self) -> str:
        assert self.served is not None
        return str(self.served.http.base_url).rstrip("/")

    def stop(self) -> None:
        if self.served is not None:
            self.served.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def checkpoints(setup: Setup) -> Any:
    def stage(_: dict[str, Any], deadline: Deadline) -> Outcome:
        from common import llama_checkpoint

        from tests.checkpoints import llama

        path = setup.work / "models" / "llama-check"
        if setup.tiny:
            llama(path, hidden=256, layers=2, vocab=4000, heads=8)
        else:
            llama_checkpoint(path, setup.params_m)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return Outcome(figures={"checkpoint_bytes": size}, checks={}, product=path)

    return stage


def server(setup: Setup) -> Any:
    def stage(inputs: dict[str, Any], deadline: Deadline) -> Outcome:
        path: Path = inputs["checkpoints"]
        env = {
            "BASEHOLD_MODEL_ROOTS": json.dumps([str(path.parent)]),
            "BASEHOLD_SEGMENT_GRACE_SECONDS": str(GRACE_S),
        }
        command = None if setup.on_gpu else HOST_SERVE
        began = time.perf_counter()
        setup.served = launch(setup.work, timeout=deadline.left(), command=command, env=env)
        return Outcome(figures={"start_s": time.perf_counter() - began}, checks={}, product=True)

    return stage


# -- loads -------------------------------------------------------------------------------------
def spec(kind: str, on_gpu: bool) -> dict[str, Any]:
    """The load request of a stage; a CPU rehearsal computes nf4 in float32."""
    if kind in ("fp32", "bf16"):
        return {"dtype": "float32" if kind == "fp32" else "bfloat16"}
    if kind == "int8":
        return {"dtype": "float16" if on_gpu else "float32", "quantization": {"method": "bnb-8bit"}}
    compute = "bfloat16" if on_gpu else "float32"
    quant = {"method": "bnb-4bit", "quant_type": "nf4", "compute_dtype": compute}
    return {"dtype": compute, "quantization": quant}


def reference(path: Path, body: dict[str, Any], where: str) -> tuple[Any, float, int, int]:
    """`from_pretrained` of the same spec on the device: (logits, seconds, model bytes,
    largest tensor bytes)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tests.reference import from_pretrained

    quant = body.get("quantization") or {}
    if quant.get("method") == "bnb-8bit":
        kwargs = {
            "dtype": getattr(torch, body["dtype"]),
            "device_map": where,
            "quantization_config": BitsAndBytesConfig(load_in_8bit=True),
        }
    else:
        kwargs = pretrained_kwargs(body, where)
    began = time.perf_counter()
    model = from_pretrained(AutoModelForCausalLM, path, **kwargs)
    if where.startswith("cuda"):
        torch.cuda.synchronize(where)
    seconds = time.perf_counter() - began
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS, device=where)).logits.float().cpu()
    del model
    gc.collect()
    if where.startswith("cuda"):
        torch.cuda.empty_cache()
    return logits, seconds, sum(sizes), max(sizes)


def post_load(
    setup: Setup, name: str, path: Path, body: dict[str, Any], deadline: Deadline
) -> dict[str, Any]:
    assert setup.served is not None
    answer = setup.served.http.post("/v1/models", json={"source": str(path), "name": name, **body})
    answer.raise_for_status()
    return wait_ready(
        setup.served.http, name, timeout=deadline.left(), process=setup.served.process
    )


def load(setup: Setup, kind: str) -> Any:
    """Load through the service and with from_pretrained on the device; a worker attaches
    and its logits must match. Kept loaded for the later stages (8-bit: unloaded, as its
    runner process holds it and cannot lend it)."""

    def stage(inputs: dict[str, Any], deadline: Deadline) -> Outcome:
        import torch

        path: Path = inputs["checkpoints"]
        body = {"device_map": setup.where, **spec(kind, setup.on_gpu)}
        expected, reference_s, model_bytes, largest = reference(path, body, setup.where)
        began = time.perf_counter()
        status = post_load(setup, kind, path, body, deadline)
        load_s = time.perf_counter() - began
        ratio = load_s / reference_s
        figures: dict[str, Any] = {
            "load_s": load_s,
            "loader_load_s": status["timings"]["load_seconds"],
            "from_pretrained_s": reference_s,
            "ratio": ratio,
            "model_bytes": int(status["memory"]["by_device"].get(setup.where, 0)),
            "from_pretrained_bytes": model_bytes,
            "shareable": status["shareable"],
            "shareable_reason": status["shareable_reason"],
        }
        if setup.on_gpu:
            figures["targets"] = {"load <= 1.1x from_pretrained(cuda)": ratio <= 1.1}
        checks = {"ready": status["state"] == "ready"}
        if kind == "int8":
            assert setup.served is not None
            checks["unload answered 204"] = (
                setup.served.http.delete("/v1/models/int8").status_code == 204
            )
            return Outcome(figures, checks)
        checks["shareable"] = bool(status["shareable"])
        found = attach_once(setup, kind, 0, deadline)
        tolerance = 2e-2 if kind != "fp32" else 1e-4
        got = torch.from_numpy(found["logits"])
        figures["logits_max_diff"] = float((got - expected).abs().max())
        figures["base_tensors"] = found["base_tensors"]
        figures["on_device"] = found["on_device"]
        figures["storages"] = found["storages"]
        checks["a worker's logits match from_pretrained"] = bool(
            torch.allclose(got, expected, atol=tolerance, rtol=tolerance)
        )
        checks["every base tensor is a view of the served segments"] = in_segments(found)
        if kind != "bf16":  # the later stages use bf16 alone
            assert setup.served is not None
            unloaded = setup.served.http.delete(f"/v1/models/{kind}").status_code
            checks["unload answered 204"] = unloaded == 204
        product = {
            "id": kind,
            "model_bytes": figures["model_bytes"],
            "largest": largest,
            "sha": found["sha"],
        }
        return Outcome(figures, checks, product=product)

    return stage


def attach_once(setup: Setup, model_id: str, steps: int, deadline: Deadline) -> dict[str, Any]:
    """A fresh worker attaches `model_id` (and trains `steps` LoRA steps): what it saw."""
    worker = Worker(attach_model, setup.url(), model_id, setup.where, steps, False)
    try:
        worker.expect("context", deadline)
        worker.tell("attach")
        found: dict[str, Any] = worker.expect("attached", deadline)
        worker.answer(deadline)
    finally:
        worker.kill()
    return found


def in_segments(found: dict[str, Any]) -> bool:
    """Every base tensor is on the model's device and a view of a few storages (the
    model's segments: a loader cuts a model into at most ~2 * 32 + 1), not one each."""
    return bool(
        found["on_device"] == found["base_tensors"]
        and found["storages"] <= min(65, max(1, found["base_tensors"] // 2))
    )


# -- memory while placing ------------------------------------------------------------------------
class PeakSampler:
    """Device-wide GPU bytes in use, sampled every millisecond on a thread."""

    def __init__(self, where: str) -> None:
        self.where, self.peak, self._stop = where, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info(self.where)
            self.peak = max(self.peak, int(total - free))
            time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def context_bytes(setup: Setup, deadline: Deadline) -> int:
    """What one process's CUDA context takes on the device (a loader has one too)."""
    worker = Worker(attach_model, setup.url(), "bf16", setup.where, 0, False)
    try:
        before = device_used(setup.where)
        worker.expect("context", deadline)
        return device_used(setup.where) - before
    finally:
        worker.kill()


def placement_peak(setup: Setup) -> Any:
    """Load the checkpoint in float16 (bf16's sizes; a spec no model held now has, else the
    service answers with that model) with the GPU sampled: the peak over the baseline, less
    a CUDA context (the loader's), against the model plus its largest tensor (+5%)."""

    def stage(inputs: dict[str, Any], deadline: Deadline) -> Outcome:
        if not setup.on_gpu:
            raise Skip("GPU only: a rehearsal has no GPU peak to measure")
        bf16 = inputs["load-bf16"]
        context = context_bytes(setup, deadline)
        settle(setup, deadline)
        baseline = device_used(setup.where)
        body = {"device_map": setup.where, "dtype": "float16"}
        with PeakSampler(setup.where) as sampler:
            status = post_load(setup, "peak", inputs["checkpoints"], body, deadline)
            wait_loaders_gone(setup, deadline)
        peak = sampler.peak - baseline - context
        limit = 1.05 * (bf16["model_bytes"] + bf16["largest"])
        assert setup.served is not None
        unloaded = setup.served.http.delete("/v1/models/peak").status_code
        return Outcome(
            figures={
                "peak_over_baseline_bytes": sampler.peak - baseline,
                "cuda_context_bytes": context,
                "peak_bytes": peak,
                "model_bytes": bf16["model_bytes"],
                "largest_tensor_bytes": bf16["largest"],
                "limit_bytes": limit,
                "targets": {"peak <= model + largest tensor + 5%": peak <= limit},
            },
            checks={"shareable": bool(status["shareable"]), "unload answered 204": unloaded == 204},
        )

    return stage


# -- workers -----------------------------------------------------------------------------------
def attach_time(setup: Setup) -> Any:
    """A fresh worker attaches to the bf16 model and trains LoRA on it: attach time, what
    its allocator grew by, the loss falls and the base's bytes stay."""

    def stage(inputs: dict[str, Any], deadline: Deadline) -> Outcome:
        bf16 = inputs["load-bf16"]
        found = attach_once(setup, bf16["id"], setup.steps, deadline)
        checks = {
            "every base tensor is a view of the served segments": in_segments(found),
            "the base's bytes are the served model's": found["sha"] == bf16["sha"],
        }
        if setup.steps:
            losses = found["losses"]
            checks.update(
                {
                    "LoRA lowered the loss": losses[-1] < losses[0],
                    "the adapter changed the output": found["adapter_changed"],
                    "base tensors never moved": found["pointers_kept"],
                    "base bytes unchanged by training": found["sha_after"] == found["sha"],
                }
            )
        figures: dict[str, Any] = {
            "attach_ms": found["attach_ms"],
            "memory_growth_bytes": found["memory_growth"],
            "losses": found.get("losses"),
        }
        if setup.on_gpu:
            figures["targets"] = {"attach <= 100 ms": found["attach_ms"] <= 100}
            checks["the worker's GPU memory grew < 1% of the model"] = (
                found["memory_growth"] < 0.01 * bf16["model_bytes"]
            )
        return Outcome(figures, checks)

    return stage


def four_workers(setup: Setup) -> Any:
    """Four workers hold the bf16 model at once: what they add on the device over their
    own CUDA contexts, summed, against the model (one copy: ~1x)."""

    def stage(inputs: dict[str, Any], deadline: Deadline) -> Outcome:
        bf16 = inputs["load-bf16"]
        workers: list[Worker] = []
        added, growth, one_segment = [], [], []
        try:
            for _ in range(4):
                worker = Worker(attach_model, setup.url(), bf16["id"], setup.where, 0, True)
                workers.append(worker)
                worker.expect("context", deadline)
                before = device_used(setup.where)
                worker.tell("attach")
                found = worker.expect("attached", deadline)
                added.append(device_used(setup.where) - before)
                growth.append(found["memory_growth"])
                one_segment.append(in_segments(found) and found["sha"] == bf16["sha"])
        finally:
            for worker in workers:
                worker.kill()
        model = max(bf16["model_bytes"], 1)
        ratio = (model + sum(added)) / model
        figures = {
            "model_bytes": model,
            "added_on_device_bytes": added,
            "worker_memory_growth_bytes": growth,
            "device_bytes_over_model": ratio,
        }
        checks = {
            "every worker's base is the served segments": all(one_segment) and len(one_segment) == 4
        }
        if setup.on_gpu:
            checks["4 workers take ~1x the model on the GPU"] = ratio <= 1.1
        return Outcome(figures, checks)

    return stage


# -- forced unload -------------------------------------------------------------------------------
def forced_unload(setup: Setup) -> Any:
    """A worker holds a model; a forced unload revokes its lease. What the model's own
    segments take is measured with its loader gone and no worker alive (a worker's CUDA
    context is not the model's); they are freed after the revoked lease's TTL."""

    def stage(inputs: dict[str, Any], deadline: Deadline) -> Outcome:
        assert setup.served is not None
        name = "forced"
        settle(setup, deadline)
        baseline = segments_now(setup)
        # float16: no model held now has this spec (the service would answer with it)
        body = {"device_map": setup.where, "dtype": "float16"}
        status = post_load(setup, name, inputs["checkpoints"], body, deadline)
        model_bytes = int(status["memory"]["by_device"].get(setup.where, 0))
        wait_loaders_gone(setup, deadline)
        held = model_segments(setup, baseline)
        holder = Worker(attach_model, setup.url(), name, setup.where, 0, True)
        try:
            holder.expect("context", deadline)
            holder.tell("attach")
            holder.expect("attached", deadline)
            forced = setup.served.http.delete(f"/v1/models/{name}", params={"force": "true"})
            kept = model_segments(setup, baseline) if not setup.on_gpu else None
            holder.tell("go")
            result = dict(holder.answer(deadline))
        finally:
            holder.kill()
        # The worker is gone with its context: what is left is the model's segments, held
        # by the service until the TTL has run out, then freed by the reaper.
        end = time.monotonic() + deadline.left(FORCED_TTL_S + 60)
        while (freed := model_segments(setup, baseline)) > (2 * MiB if setup.on_gpu else 0):
            if time.monotonic() >= end:
                break
            time.sleep(0.1)
        checks = {
            "forced unload answered 204": forced.status_code == 204,
            "the worker saw its lease lost": bool(result["lost"]),
            "the worker's next forward raised LeaseLost": bool(result["raised"]),
            "the segments were freed after the TTL": freed <= (2 * MiB if setup.on_gpu else 0),
        }
        if setup.on_gpu:  # segments are rounded up to the VMM granularity (2 MiB) each
            checks["the model's segments hold the model, once"] = (
                0.99 * model_bytes <= held <= 1.25 * model_bytes
            )
        else:
            checks["the segments outlived the forced unload"] = kept == held and held > 0
        return Outcome(
            figures={
                "model_bytes": model_bytes,
                "segments_held": held,  # bytes on a GPU, stand-in segments in a rehearsal
                "segments_after": freed,
            },
            checks=checks,
        )

    return stage


def segments_now(setup: Setup) -> int | frozenset[int]:
    """GPU bytes in use (every process's), or, in a rehearsal, the stand-in segments (the
    memfds' inodes) the server holds."""
    if setup.on_gpu:
        return device_used(setup.where)
    assert setup.served is not None
    inodes = set()
    for fd in Path(f"/proc/{setup.served.process.pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(STAND_IN_FD):
                inodes.add(os.stat(fd).st_ino)
        except OSError:
            continue
    return frozenset(inodes)


def model_segments(setup: Setup, baseline: int | frozenset[int]) -> int:
    """The model's segments since `baseline` (no loader nor worker alive): GPU bytes, or
    the number of stand-in segments the server holds."""
    now = segments_now(setup)
    if isinstance(now, int) and isinstance(baseline, int):
        return now - baseline
    assert isinstance(now, frozenset) and isinstance(baseline, frozenset)
    return len(now - baseline)


def settle(setup: Setup, deadline: Deadline) -> None:
    """Before a baseline: no loader alive, and (on a GPU) memory in use steady for a second
    once an unloaded model's grace has run out (its segments are freed after it)."""
    wait_loaders_gone(setup, deadline)
    if not setup.on_gpu:
        return
    began = time.monotonic()
    end = began + deadline.left(GRACE_S + 30)
    last = device_used(setup.where)
    while time.monotonic() < end:
        time.sleep(1.0)
        now = device_used(setup.where)
        if abs(now - last) < MiB and time.monotonic() - began > GRACE_S + 3:
            return
        last = now


def wait_loaders_gone(setup: Setup, deadline: Deadline) -> None:
    """Until no loader of the server is alive: READY is set before the loader exits, and
    its memory (a CUDA context, sources not yet freed) is not the model's."""
    assert setup.served is not None
    end = time.monotonic() + deadline.left(60)
    while loaders(setup.served.process.pid):
        if time.monotonic() >= end:
            raise TimeoutError("a loader was still alive 60 s after its model was ready")
        time.sleep(0.02)


def loaders(server_pid: int) -> list[int]:
    """The server's loaders: forks of its loader template (`service.loader.forker`)."""
    parents: dict[int, int] = {}
    forkers: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if b"service.loader.forker" in (proc / "cmdline").read_bytes():
                forkers.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue

    def under_server(pid: int) -> bool:
        while pid > 1:
            if pid == server_pid:
                return True
            pid = parents.get(pid, 0)
        return False

    return [p for p in forkers if parents.get(p) in forkers and under_server(p)]
