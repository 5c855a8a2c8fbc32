"""Validate a GPU node for basehold's handles, end to end, in under five minutes.

    python bench/gpu_check.py                    # on a node with a CUDA GPU
    python bench/gpu_check.py --rehearse-on-cpu  # the same flow without one (CI runs it)

1. Preflight (< 15 s): versions of torch, CUDA, the driver, bitsandbytes, peft and
   transformers; the GPU's name and UUID. Then a process makes a 1 MiB device segment
   through the real `CudaSegments` (a CUDA VMM allocation), hands its POSIX fd to this
   one and exits; a second process, in a new PID namespace (`unshare --pid --fork`, as
   root), opens the segment from that fd and checks its bytes: the segment outlives its
   loader and crosses PID namespaces. Any failure stops the run with one clear line.
2. For bf16, nf4, nf4 with double quant and a tied-embedding checkpoint: a real
   `basehold serve` loads a generated Llama on cuda:0; independent workers attach through
   `Client.attach` and the script checks that every base tensor is a view of the one
   segment, that the worker's allocator did not grow by the model, that the logits equal
   `from_pretrained` of the same spec, that LoRA steps lower the loss without changing a
   base byte, that a second worker gets identical logits, that the GPU memory in use
   (NVML) while held is at most 1.25x the model's bytes and returns after unload.
3. A forced unload while a worker is attached: the worker's next forward raises
   `LeaseLost`, and the segment is freed once the revoked lease's TTL has run out.

Every wait has a deadline and notices a dead server. One table, PASS/FAIL lines, exit 1
on any failure. `--rehearse-on-cpu` runs the same flow with the host stand-in for device
segments (tests/common/handles/host_segments.py) in the server and the workers, float32 standing
in for bf16: everything but the CUDA calls themselves.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from common import ROOT, Served, launch, llama_checkpoint, reference_model, wait_ready

TOKENS = [[1, 15, 27, 300, 400, 9, 81, 2, 640, 77, 5, 120]]  # < 1000: fits every vocab here
MiB = 2**20
SPECS = ("bf16", "nf4", "nf4-dq", "tied")
HOST_SERVE = [sys.executable, str(ROOT / "tests" / "worker" / "host_serve.py")]
STAND_IN_FD = "/memfd:basehold-segment"
GRACE_S = 2.0  # BASEHOLD_SEGMENT_GRACE_SECONDS for the server: segments outlive a release


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, at_most: float = 1e9) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("gpu_check ran out of its time budget")
        return min(remaining, at_most)


# -- the worker side (a process of its own) ---------------------------------------------------
def devices_for(where: str) -> Any:
    """How a worker opens segments: CUDA VMM fds, or the host stand-in in a rehearsal."""
    if where.startswith("cuda"):
        return None
    from tests.common.handles.host_segments import HostSegments

    return HostSegments()


def base_tensors(model: Any) -> list[Any]:
    from service.loader.footprint import all_tensors

    return [t for _, t in all_tensors(model) if t.numel()]


def sha256_of(tensors: list[Any]) -> str:
    import torch

    digest = hashlib.sha256()
    seen = set()
    for tensor in sorted(tensors, key=lambda t: t.data_ptr()):
        key = (tensor.data_ptr(), tensor.numel(), str(tensor.dtype))
        if key not in seen:
            seen.add(key)
            flat = tensor.detach().contiguous().reshape(-1)
            digest.update(bytes(flat.view(torch.uint8).cpu().numpy().tobytes()))
    return digest.hexdigest()


def device_memory(device: Any) -> tuple[int, int]:
    """(caching-allocator bytes, device free bytes); zeros on CPU."""
    import torch

    if device.type != "cuda":
        return 0, 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device), torch.cuda.mem_get_info(device)[0]


def worker_main(
    url: str,
    model_id: str,
    mode: str,
    steps: int,
    out: str,
    where: str,
    say: Callable[[Any], None],
    listen: Callable[[], Any],
) -> dict[str, Any]:
    """`train`: attach, measure, forward, LoRA, checksum. `hold`: attach, say so, wait to
    be told, wait until the lease is lost, then try a forward pass."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from service.worker.client import Client, LeaseLost, lease_of

    device = torch.device(where)
    torch.zeros(1, device=device)  # CUDA context first: it is not the model's memory
    client = Client(url)
    attach = client.attach(
        model_id, ttl_seconds=3 if mode == "hold" else 60, devices=devices_for(where), wait=60
    )
    if mode == "hold":
        with attach as model:
            say("attached")
            listen()
            lease = lease_of(model)
            deadline = time.monotonic() + 10
            while not lease.lost and time.monotonic() < deadline:
                time.sleep(0.1)
            try:
                with torch.no_grad():
                    model(torch.tensor(TOKENS, device=device))
                raised = False
            except LeaseLost:
                raised = True
            return {"lost": lease.lost, "raised": raised}
    allocated_before, free_before = device_memory(device)
    start = time.perf_counter()
    result: dict[str, Any] = {}
    with attach as model:
        base = base_tensors(model)
        allocated_after, free_after = device_memory(device)
        result["attach_ms"] = (time.perf_counter() - start) * 1000
        result["allocated_growth"] = allocated_after - allocated_before
        result["free_drop"] = free_before - free_after
        result["base_tensors"] = len(base)
        result["on_device"] = sum(t.device == device for t in base)
        result["storages"] = len({t.untyped_storage().data_ptr() for t in base})
        pointers = {t.data_ptr() for t in base}
        result["sha_before"] = sha256_of(base)
        tokens = torch.tensor(TOKENS, device=device)
        with torch.no_grad():
            logits = model(tokens).logits.float()
        save_file({"logits": logits.cpu().contiguous()}, out)
        if steps:
            config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
            lora = get_peft_model(model, config)
            trainable = [p for p in lora.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=5e-3)
            generator = torch.Generator(device="cpu").manual_seed(0)
            batch = torch.randint(0, 1000, (4, 32), generator=generator).to(device)
            losses = []
            for _ in range(steps):
                loss = lora(input_ids=batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss))
            with torch.no_grad():
                adapted = lora(tokens).logits.float()
            result["losses"] = losses
            result["adapter_changed"] = bool((adapted - logits).abs().max() > 0)
            frozen = [t for t in base_tensors(model) if not t.requires_grad]
            result["pointers_kept"] = {t.data_ptr() for t in frozen} == pointers
            result["sha_after"] = sha256_of(frozen)
            del lora, optimizer
    return result


def _worker_process(conn: Connection, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """A worker process: runs `target(*args, say=..., listen=...)`, sends ("result", its
    answer) or ("error", a traceback)."""
    try:
        conn.send(("result", target(*args, say=conn.send, listen=conn.recv)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


# The workers are forks of a forkserver that imported these once (never the CUDA context:
# each worker makes its own): ~6 s of imports a worker saved, nothing else shared.
WORKER_PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "transformers.integrations.bitsandbytes",
    "peft",
    "bitsandbytes",
    "safetensors.torch",
    "service.worker.client",
    "tests.common.handles.host_segments",
]


class Worker:
    """A worker process: a fresh process of its own (forkserver), talked to over a pipe."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(WORKER_PRELOAD)
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_worker_process, args=(theirs, target, args))
        self.process.start()
        theirs.close()

    def said(self, deadline: Deadline, at_most: float = 180) -> Any:
        if not self.conn.poll(deadline.left(at_most)):
            self.process.kill()
            raise TimeoutError("a worker said nothing in time")
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"worker died ({self.process.exitcode})") from None

    def tell(self, message: Any) -> None:
        self.conn.send(message)

    def answer(self, deadline: Deadline) -> Any:
        kind, value = self.said(deadline)
        self.process.join(deadline.left(60))
        if kind != "result":
            raise RuntimeError(f"worker failed:\n{str(value)[-4000:]}")
        return value

    def finish(self, deadline: Deadline) -> dict[str, Any]:
        return dict(self.answer(deadline))


def worker(url: str, model_id: str, mode: str, steps: int, out: Path, where: str) -> Worker:
    return Worker(worker_main, url, model_id, mode, steps, str(out), where)


# -- preflight -------------------------------------------------------------------------------
PATTERN_MOD = 251


def segment_export_main(where: str, say: Callable[[Any], None], listen: Callable[[], Any]) -> str:
    """The preflight's loader: allocate and fill a 1 MiB segment, hand its fd to the parent
    (as the loader hands it to the service), and exit."""
    from multiprocessing import reduction

    import torch

    from service.common.handles.devices import CUDA

    devices = devices_for(where) or CUDA
    segment = devices.allocate(torch.device(where), MiB)
    segment[:MiB].copy_(torch.arange(MiB, dtype=torch.int64).remainder(PATTERN_MOD).to(torch.uint8))
    described, fd = devices.publish(where, segment, 1)
    say(("segment", described.model_dump_json()))
    reduction.send_handle(say.__self__, fd, os.getppid())  # type: ignore[attr-defined]
    os.close(fd)
    return hashlib.sha256(bytes(segment[:MiB].cpu().numpy().tobytes())).hexdigest()


def probe_segment(where: str, described_json: str, fd: int) -> str:
    """`--probe-segment`: open a segment from an inherited fd; print its first MiB's digest."""
    from service.common.handles.descriptor import DeviceSegment
    from service.common.handles.devices import CUDA

    described = DeviceSegment.model_validate_json(described_json)
    opened = (devices_for(where) or CUDA).open(described, fd)
    return hashlib.sha256(bytes(opened[:MiB].cpu().numpy().tobytes())).hexdigest()


def _probe_command(where: str, described: str, fd: int) -> tuple[list[str], str]:
    """The probe in a new PID namespace where this user may make one (root), as a worker
    in another pod would run; else a plain child process."""
    command = [sys.executable, __file__, "--probe-segment", described, "--probe-fd", str(fd)]
    command += ["--rehearse-on-cpu"] if where == "cpu" else []
    if os.geteuid() == 0 and shutil.which("unshare"):
        return ["unshare", "--pid", "--fork", *command], "in another PID namespace"
    return command, "in another process (not root: no new PID namespace)"


def preflight(where: str) -> list[str]:
    """Versions and the one GPU, then a 1 MiB segment made by a process that exits, opened
    from its fd by another process in another PID namespace. Returns the lines to print;
    raises SystemExit with one clear line on failure."""
    from multiprocessing import reduction

    import bitsandbytes
    import peft
    import torch
    import transformers

    from service.common.handles.devices import CUDA

    lines = [
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
        f"{transformers.__version__}, peft {peft.__version__}, bitsandbytes "
        f"{bitsandbytes.__version__}",
    ]
    if where.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        driver = "?"
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = str(pynvml.nvmlSystemGetDriverVersion())
        except Exception as exc:  # NVML is optional for handles; say so
            driver = f"unknown (NVML: {exc})"
        lines.append(
            f"GPU: {props.name}, UUID GPU-{props.uuid}, {props.total_memory / 2**30:.0f} GiB, "
            f"driver {driver}, {torch.cuda.device_count()} visible"
        )
        reason = CUDA.unavailable()
        if reason is not None:
            raise SystemExit(f"FAIL preflight: {reason}")
    else:
        lines.append("GPU: none (rehearsal: host stand-in for device segments)")
    exporter = Worker(segment_export_main, where)
    deadline = Deadline(60)
    said = exporter.said(deadline)
    if said[0] != "segment":
        raise SystemExit(f"FAIL preflight: the exporting process failed: {str(said)[-2000:]}")
    fd = reduction.recv_handle(exporter.conn)
    try:
        expected = str(exporter.answer(deadline))
        if exporter.process.exitcode is None:
            raise SystemExit("FAIL preflight: the exporting process did not exit")
        command, where_probe = _probe_command(where, said[1], fd)
        probe = subprocess.run(
            command, pass_fds=(fd,), capture_output=True, text=True, timeout=60, cwd=ROOT
        )
    finally:
        os.close(fd)
    got = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else probe.stderr[-500:]
    if got != expected:
        raise SystemExit(
            f"FAIL preflight: a 1 MiB device segment could not be read {where_probe} after "
            f"the process that made it exited ({got})"
        )
    lines.append(
        f"segment: 1 MiB made by a process that exited, read back from its fd {where_probe}"
    )
    return lines


# -- the checks ------------------------------------------------------------------------------
def spec(name: str, device: str) -> dict[str, Any]:
    """The load request; on CPU (rehearsal) float32 stands in for bf16, which is slow there."""
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    body: dict[str, Any] = {"device_map": device, "dtype": dtype}
    if name.startswith("nf4"):
        body["quantization"] = {
            "method": "bnb-4bit",
            "quant_type": "nf4",
            "compute_dtype": dtype,
            "double_quant": name == "nf4-dq",
        }
    return body


def reference_logits(path: Path, name: str, device: str) -> Any:
    """`from_pretrained` of the same spec, in this process."""
    import torch

    model = reference_model(path, spec(name, device), device_map=device)
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS, device=device)).logits.float().cpu()
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return logits


def service_reserved(served: Served) -> int:
    """What the GPU has in use (NVML, as the service reports it): the segments the service
    holds by their fds are there; the serving process itself allocates nothing."""
    devices = served.http.get("/v1/memory").json()["devices"]
    return int(devices[0]["used_bytes"]) if devices else 0


def stand_in_segments(served: Served) -> int:
    """Rehearsal: device segments the server still holds (distinct memfds it has open)."""
    inodes = set()
    for fd in Path(f"/proc/{served.process.pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(STAND_IN_FD):
                inodes.add(os.stat(fd).st_ino)
        except OSError:
            continue
    return len(inodes)


def freed_by_and_by(
    served: Served, device: str, held: int, deadline: Deadline, within: float
) -> int:
    """Poll until the service holds less than `held` for segments (nothing at all in a
    rehearsal), at most `within` seconds; returns what it holds then. A busy machine
    makes the reaper late, never the check wrong."""
    end = time.monotonic() + deadline.left(within)
    while True:
        now = segments_held(served, device)
        done = now < held and (now == 0 or device.startswith("cuda"))
        if done or time.monotonic() >= end:
            return now
        time.sleep(0.1)


def segments_held(served: Served, device: str) -> int:
    """What the service holds for device segments: reserved bytes on a GPU, or the
    stand-in segments in a rehearsal."""
    return service_reserved(served) if device.startswith("cuda") else stand_in_segments(served)


def load(served: Served, path: Path, name: str, device: str, deadline: Deadline) -> dict[str, Any]:
    body = {"source": str(path), "name": name, **spec(name, device)}
    served.http.post("/v1/models", json=body).raise_for_status()
    status = wait_ready(served.http, name, timeout=deadline.left(240), process=served.process)
    if not status["shareable"]:
        raise RuntimeError(f"{name}: not shareable: {status['shareable_reason']}")
    return status


def check(
    name: str, path: Path, served: Served, work: Path, steps: int, device: str, deadline: Deadline
) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    expected = reference_logits(path, name, device)
    reserved_before = service_reserved(served)
    status = load(served, path, name, device, deadline)
    model_bytes = int(status["memory"]["by_device"].get(device, 0))
    reserved_held = service_reserved(served)
    url = str(served.http.base_url).rstrip("/")
    first = worker(url, name, "train", steps, work / f"{name}-1.st", device).finish(deadline)
    second = worker(url, name, "train", 0, work / f"{name}-2.st", device).finish(deadline)
    got = load_file(str(work / f"{name}-1.st"))["logits"]
    again = load_file(str(work / f"{name}-2.st"))["logits"]
    unloaded = served.http.delete(f"/v1/models/{name}").status_code
    kept = segments_held(served, device)
    # The grace after a release, then the reaper: polled, never a fixed sleep.
    freed = freed_by_and_by(served, device, kept, deadline, GRACE_S + 60)
    reserved_after = service_reserved(served)
    on_gpu = device.startswith("cuda")
    row = {
        "spec": name if on_gpu or not name.startswith(("bf16", "tied")) else f"{name} (float32)",
        "model_mib": model_bytes / MiB,
        "reserved": (reserved_before, reserved_held, reserved_after),
        "attach_ms": first["attach_ms"],
        "worker_alloc_mib": first["allocated_growth"] / MiB,
        "in_segment": f"{first['on_device']}/{first['base_tensors']} in "
        f"{first['storages']} storage(s)",
        "logits_max_diff": float((got - expected).abs().max()),
        "losses": (first["losses"][0], first["losses"][-1]),
        "checks": {
            "every base tensor is on the model's device": first["on_device"]
            == first["base_tensors"],
            "one segment holds every base tensor": first["storages"] == 1,
            "logits match from_pretrained": torch.allclose(got, expected, atol=2e-2, rtol=2e-2),
            "LoRA lowered the loss": first["losses"][-1] < first["losses"][0],
            "adapter output changed": first["adapter_changed"],
            "base tensors never moved": first["pointers_kept"],
            "base bytes unchanged by training": first["sha_before"] == first["sha_after"],
            "a second worker reads the same bytes": second["sha_before"] == first["sha_before"],
            "a second worker's logits are identical": torch.equal(got, again),
            "unload answered 204": unloaded == 204,
            "segments outlived the release for the grace, then were freed": kept > freed
            and (freed == 0 or device.startswith("cuda")),
        },
    }
    if on_gpu:
        row["checks"].update(
            {
                "worker allocated < 1% of the model": first["allocated_growth"]
                < 0.01 * model_bytes,
                "device free memory fell < 10% of the model in the worker": first["free_drop"]
                < 0.1 * model_bytes,
                "GPU memory used while held <= 1.25x the model": reserved_held - reserved_before
                <= 1.25 * model_bytes,
                "GPU memory returned after unload": reserved_after
                <= reserved_before + 0.05 * model_bytes,
            }
        )
    return row


def forced_unload(
    path: Path, served: Served, work: Path, device: str, deadline: Deadline
) -> dict[str, bool]:
    """A worker holds the model; a forced unload revokes its lease (TTL 3 s)."""
    name = "forced"
    load(served, path, name, device, deadline)
    held = segments_held(served, device)
    url = str(served.http.base_url).rstrip("/")
    holder = worker(url, name, "hold", 0, work / "forced.st", device)
    said = holder.said(deadline)
    if said != "attached":
        raise RuntimeError(f"the holding worker did not attach: {str(said)[-3000:]}")
    forced = served.http.delete(f"/v1/models/{name}", params={"force": "true"}).status_code
    kept = segments_held(served, device)
    holder.tell("go")
    result = holder.finish(deadline)
    freed = freed_by_and_by(served, device, held, deadline, 3 + 60)  # the TTL, the reaper
    return {
        "forced unload answered 204": forced == 204,
        "the segment outlived the forced unload": kept == held and held > 0,
        "the worker saw its lease lost": result["lost"],
        "the worker's next forward raised LeaseLost": result["raised"],
        "the segment was freed after the TTL": freed < held
        and (freed == 0 or device.startswith("cuda")),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=120)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=290, help="seconds for the whole run")
    parser.add_argument("--rehearse-on-cpu", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a ~3M-param Llama (for tests)")
    parser.add_argument("--probe-segment", help=argparse.SUPPRESS)
    parser.add_argument("--probe-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_segment:
        where = "cpu" if args.rehearse_on_cpu else "cuda"
        print(probe_segment(where, args.probe_segment, args.probe_fd))
        return 0
    import torch

    device = "cpu" if args.rehearse_on_cpu else "cuda:0"
    if device != "cpu" and not torch.cuda.is_available():
        print(
            "gpu_check needs a CUDA GPU; this machine has none (--rehearse-on-cpu runs the "
            "same flow on CPU)",
            file=sys.stderr,
        )
        return 2
    from tests.checkpoints import llama

    began = time.perf_counter()
    deadline = Deadline(args.budget)
    for line in preflight(device):
        print(f"preflight: {line}", flush=True)
    print(f"preflight: done in {time.perf_counter() - began:.1f} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="basehold-gpu-check-"))
    path, tied = work / "models" / "llama-check", work / "models" / "llama-tied"
    if args.tiny:
        llama(path, hidden=256, layers=2, vocab=4000, heads=8)
        llama(tied, hidden=256, layers=2, vocab=4000, heads=8, tied=True)
    else:
        llama_checkpoint(path, args.params_m)
        llama(tied, hidden=1024, layers=4, vocab=32000, heads=16, tied=True)
    rows, extra = [], {}
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(path.parent)]),
        "BASEHOLD_SEGMENT_GRACE_SECONDS": str(GRACE_S),
    }
    command = HOST_SERVE if device == "cpu" else None
    served = launch(work, timeout=deadline.left(120), command=command, env=env)
    try:
        extra = forced_unload(path, served, work, device, deadline)  # first: nothing retired
        for name in SPECS:
            source = tied if name == "tied" else path
            rows.append(check(name, source, served, work, args.steps, device, deadline))
    finally:
        served.stop()
        shutil.rmtree(work, ignore_errors=True)
    where = torch.cuda.get_device_name(0) if device != "cpu" else "CPU (rehearsal, float32)"
    print(f"\nbasehold gpu_check: Llama ~{args.params_m}M params on {where}, {args.steps} steps")
    print(
        "\n| spec | model on the device (MiB) | attach (ms) | worker allocator growth (MiB) "
        "| base tensors | logits max abs diff vs from_pretrained | LoRA loss first -> last "
        "| GPU used before / held / after unload (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        before, held, after = (x / MiB for x in row["reserved"])
        print(
            f"| {row['spec']} | {row['model_mib']:.0f} | {row['attach_ms']:.0f} | "
            f"{row['worker_alloc_mib']:.2f} | {row['in_segment']} | "
            f"{row['logits_max_diff']:.3g} | {row['losses'][0]:.3f} -> {row['losses'][1]:.3f} "
            f"| {before:.0f} / {held:.0f} / {after:.0f} |"
        )
    failed = 0
    print()
    for row in rows:
        for what, ok in row["checks"].items():
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {row['spec']}: {what}")
    for what, ok in extra.items():
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  forced unload: {what}")
    print(f"\n{failed} check(s) failed; {time.perf_counter() - began:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
