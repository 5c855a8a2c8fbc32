"""gpu_check's worker side: processes forked from a forkserver (gpu_check's worker
template), talked to over a pipe. Each function here runs in such a process as
`target(*args, say=..., listen=...)`; `say` sends to gpu_check, `listen` waits for it.

The forkserver imports `gpu_check.WORKER_PRELOAD` once, never CUDA: every worker makes its
own context after the fork (a fork of a process that initialized CUDA cannot use it).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import multiprocessing
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from multiprocessing import forkserver, reduction
from multiprocessing.connection import Connection
from typing import Any

from gpu_check_runner import Deadline

TOKENS = [[1, 15, 27, 300, 400, 9, 81, 2, 640, 77, 5, 120]]  # < 1000: fits every vocab here
PATTERN_MOD = 251
NOBODY = 65534
CLONE_NEWPID = 0x20000000
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"

Say = Callable[[Any], None]
Listen = Callable[[], Any]


# -- the worker template ----------------------------------------------------------------------
def start_template(preload: list[str], paths: list[str]) -> None:
    """Start the forkserver with `preload`, `paths` on its PYTHONPATH (it does not get this
    process's sys.path before it preloads) and PYTORCH_NVML_BASED_CUDA_CHECK=1 (torch then
    asks NVML, not CUDA, whether a GPU is there), both set for it alone: the service's own
    templates must set the latter themselves, and this run would hide it if they did not."""
    multiprocessing.set_forkserver_preload(preload)
    saved = {name: os.environ.get(name) for name in (NVML_CHECK, "PYTHONPATH")}
    os.environ[NVML_CHECK] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [saved["PYTHONPATH"]])])
    try:
        forkserver.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker_process(conn: Connection, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(("result", target(*args, say=conn.send, listen=conn.recv)))
    except BaseException:
        failure = traceback.format_exc()
        print(f"gpu_check worker {os.getpid()} failed:\n{failure}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):  # gpu_check may be gone
            conn.send(("error", failure))


class Worker:
    """A process forked from the worker template, running `target(*args)`."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        context = multiprocessing.get_context("forkserver")
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
        except (EOFError, ConnectionResetError):
            self.process.join(5)
            raise WorkerDied(self.process.exitcode) from None

    def expect(self, what: str, deadline: Deadline) -> Any:
        """The next message, which must be (`what`, value): the value."""
        said = self.said(deadline)
        if not (isinstance(said, tuple) and said[0] == what):
            raise RuntimeError(f"a worker said {str(said)[-3000:]} (expected {what})")
        return said[1]

    def tell(self, message: Any) -> None:
        self.conn.send(message)

    def send_fd(self, fd: int) -> None:
        reduction.send_handle(self.conn, fd, self.process.pid or 0)

    def answer(self, deadline: Deadline) -> Any:
        said = self.said(deadline)
        self.process.join(deadline.left(60))
        if not (isinstance(said, tuple) and said[0] == "result"):
            raise RuntimeError(f"worker failed:\n{str(said[1] if said else said)[-3000:]}")
        return said[1]

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)


class WorkerDied(RuntimeError):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"the worker died (exit code {code})")
        self.code = code


def cuda_state(preload: list[str], say: Say, listen: Listen) -> dict[str, Any]:
    """Right after the fork: did the template initialize CUDA? In a fork of a process that
    did, torch reports a bad fork (and is_initialized() is False there), so both count."""
    import torch

    return {
        "initialized": bool(torch.cuda.is_initialized()),
        "bad_fork": bool(torch.cuda._is_in_bad_fork()),
        "preloaded": [name for name in preload if name in sys.modules],
        "peft_or_bitsandbytes_preloaded": [n for n in ("peft", "bitsandbytes") if n in sys.modules],
    }


# -- device segments ---------------------------------------------------------------------------
def devices_for(where: str) -> Any:
    """How a process makes and opens segments: CUDA VMM fds, or the host stand-in in a
    rehearsal (tests/common/handles/host_segments.py)."""
    if where.startswith("cuda"):
        from service.common.handles.devices import CUDA

        return CUDA
    from tests.common.handles.host_segments import HostSegments

    return HostSegments()


def digest(segment: Any, size: int) -> str:
    return hashlib.sha256(bytes(segment[:size].cpu().numpy().tobytes())).hexdigest()


def pattern(size: int) -> Any:
    import torch

    return torch.arange(size, dtype=torch.int64).remainder(PATTERN_MOD).to(torch.uint8)


def export_segment(where: str, size: int, say: Say, listen: Listen) -> str:
    """The loader's part: allocate and fill a segment, hand its fd to gpu_check (as a
    loader hands it to the service), and exit. Returns the segment's digest."""
    import torch

    devices = devices_for(where)
    device = torch.device(where)
    segment = devices.allocate(device, size)
    segment[:size].copy_(pattern(size).to(device))
    described, fd = devices.publish(where, segment, 1)
    say(("segment", described.model_dump_json()))
    reduction.send_handle(say.__self__, fd, os.getppid())  # type: ignore[attr-defined]
    os.close(fd)
    return digest(segment, size)


def _open(where: str, described_json: str, fd: int, size: int) -> str:
    from service.common.handles.descriptor import DeviceSegment

    described = DeviceSegment.model_validate_json(described_json)
    return digest(devices_for(where).open(described, fd), size)


def import_segment(
    where: str, described_json: str, size: int, mode: str, say: Say, listen: Listen
) -> dict[str, Any]:
    """A worker's part: receive the segment's fd and read it back, as this uid (`same`),
    as nobody (`other-uid`), or from a child in a new PID namespace (`pid-namespace`)."""
    fd = reduction.recv_handle(say.__self__)  # type: ignore[attr-defined]
    if mode == "other-uid":
        if os.geteuid() != 0:
            return {"skipped": "not root: no other uid to become"}
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    if mode != "pid-namespace":
        return {"digest": _open(where, described_json, fd, size), "uid": os.geteuid()}
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        errno = ctypes.get_errno()
        return {
            "skipped": f"unshare(CLONE_NEWPID) not permitted here ({os.strerror(errno)}): "
            "it needs CAP_SYS_ADMIN; a worker in another pod is not rehearsed"
        }
    read, write = os.pipe()
    child = os.fork()  # pid 1 of the new namespace
    if child == 0:
        code = 0
        try:
            os.close(read)
            found = {"digest": _open(where, described_json, fd, size), "pid": os.getpid()}
        except BaseException as exc:
            found, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        with contextlib.suppress(BaseException):
            os.write(write, json.dumps(found).encode())
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(child, 0)
    found = json.loads(answer) if answer else {"error": f"child ended with status {status}"}
    return {**found, "namespace_child_pid": found.get("pid")}


def read_only_segment(
    where: str, described_json: str, size: int, say: Say, listen: Listen
) -> dict[str, Any]:
    """Map the segment read-only as a worker does, read it, then try to write to it: the
    write must fail. A refused write takes this process down with it (an illegal address
    on the GPU poisons its CUDA context; SIGSEGV on the CPU), so this runs alone."""
    import torch

    fd = reduction.recv_handle(say.__self__)  # type: ignore[attr-defined]
    if where.startswith("cuda"):
        from service.common.handles import vmm
        from service.common.handles.descriptor import DeviceSegment
        from service.common.handles.devices import CUDA

        described = DeviceSegment.model_validate_json(described_json)
        try:
            index = CUDA.local_index(described)
            mapping = vmm.import_fd(fd, index, described.size, read_only=True)
        except TypeError as exc:
            raise RuntimeError(
                "vmm.import_fd takes no read_only: this build maps worker segments read-write"
            ) from exc
        if not hasattr(mapping, "read_only"):
            raise RuntimeError("vmm.Mapping has no read_only: this build cannot say how it mapped")
        read_only = bool(mapping.read_only)
        tensor = mapping.tensor()
    else:
        from service.common.handles.descriptor import DeviceSegment

        described = DeviceSegment.model_validate_json(described_json)
        try:
            tensor = devices_for(where).open(described, fd, read_only=True)
            read_only = bool(getattr(tensor, "basehold_read_only", False))
        except TypeError:  # a stand-in without read-only mappings: PROT_READ, as a worker's
            view = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                tensor = torch.frombuffer(view, dtype=torch.uint8)
            read_only = True
    say(("mapped", {"read_only": read_only, "digest": digest(tensor, size)}))
    if not read_only:
        return {"write": "not tried: the mapping is read-write"}
    try:
        tensor[:1].fill_(7)
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
    except Exception as exc:
        return {"write": "refused", "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"write": "went through"}


# -- models ------------------------------------------------------------------------------------
def _memory(where: str) -> int:
    """What this worker adds to its device: device used bytes on a GPU (its context made
    first), its private bytes on the CPU (stand-in segments are shared memory)."""
    import torch

    if where.startswith("cuda"):
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return int(total - free)
    from common import private_bytes

    return private_bytes()


def _base(model: Any) -> list[Any]:
    from service.loader.footprint import all_tensors

    return [t for _, t in all_tensors(model) if t.numel()]


def sha256_of(tensors: list[Any]) -> str:
    import torch

    hashed = hashlib.sha256()
    seen = set()
    for tensor in sorted(tensors, key=lambda t: t.data_ptr()):
        key = (tensor.data_ptr(), tensor.numel(), str(tensor.dtype))
        if key not in seen:
            seen.add(key)
            flat = tensor.detach().contiguous().reshape(-1)
            hashed.update(bytes(flat.view(torch.uint8).cpu().numpy().tobytes()))
    return hashed.hexdigest()


def attach_model(
    url: str, model_id: str, where: str, steps: int, hold: bool, say: Say, listen: Listen
) -> dict[str, Any]:
    """Make a CUDA context (it is not the model's memory), say ("context", ...), wait;
    attach and measure, compute logits (and `steps` LoRA steps), say ("attached", ...);
    with `hold`, wait to be told, then until the lease is lost, then try a forward pass."""
    import torch

    from service.worker.client import Client, LeaseLost, lease_of

    device = torch.device(where)
    torch.zeros(1, device=device)
    say(("context", {"pid": os.getpid()}))
    listen()
    before = _memory(where)
    start = time.perf_counter()
    attach = Client(url).attach(
        model_id, ttl_seconds=3 if hold else 60, devices=_devices_arg(where), wait=60
    )
    with attach as model:
        base = _base(model)
        found: dict[str, Any] = {
            "attach_ms": (time.perf_counter() - start) * 1000,
            "memory_growth": _memory(where) - before,
            "base_tensors": len(base),
            "on_device": sum(t.device == device for t in base),
            "storages": len({t.untyped_storage().data_ptr() for t in base}),
            "sha": sha256_of(base),
        }
        tokens = torch.tensor(TOKENS, device=device)
        with torch.no_grad():
            logits = model(tokens).logits.float().cpu()
        # As numpy: a torch tensor sent over the pipe travels as an fd this process serves
        # from a thread until it exits, a race with gpu_check's receiving it.
        found["logits"] = logits.numpy()
        if steps:
            found.update(_lora(model, tokens, logits, steps, base))
        say(("attached", found))
        if not hold:
            return {}
        listen()
        lease = lease_of(model)
        until = time.monotonic() + 10
        while not lease.lost and time.monotonic() < until:
            time.sleep(0.05)
        try:
            with torch.no_grad():
                model(tokens)
            raised = False
        except LeaseLost:
            raised = True
        return {"lost": lease.lost, "raised": raised}


def _devices_arg(where: str) -> Any:
    return None if where.startswith("cuda") else devices_for(where)


def _lora(model: Any, tokens: Any, logits: Any, steps: int, base: list[Any]) -> dict[str, Any]:
    """LoRA steps on the attached base: the loss falls, the base's bytes stay."""
    import torch
    from peft import LoraConfig, get_peft_model  # after the fork: peft may import bitsandbytes

    pointers = {t.data_ptr() for t in base}
    lora = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    trainable = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-3)
    generator = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(0, 1000, (4, 32), generator=generator).to(tokens.device)
    losses = []
    for _ in range(steps):
        loss = lora(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        adapted = lora(tokens).logits.float().cpu()
    frozen = [t for t in _base(model) if not t.requires_grad]
    return {
        "losses": losses,
        "adapter_changed": bool((adapted - logits).abs().max() > 0),
        "pointers_kept": {t.data_ptr() for t in frozen} == pointers,
        "sha_after": sha256_of(frozen),
    }
