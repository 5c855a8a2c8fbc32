"""Handles on one CUDA GPU, end to end, in a few minutes.

For bf16 and nf4 (bnb 4-bit, bf16 compute): a real `basehold serve` on 127.0.0.1 loads a
generated Llama on cuda:0; an independent worker process (a fresh interpreter, not a fork)
attaches through `Client.attach`, and the script checks that
  - every base tensor in the worker is a view of the one CUDA IPC segment, and the worker's
    caching allocator (and the device's free memory) did not grow by the model's bytes;
  - the worker's logits equal `from_pretrained` of the same spec in this process;
  - LoRA steps (peft, q_proj/v_proj) lower the loss and change the adapter output;
  - the base bytes are unchanged: sha256 over every base tensor before and after training,
    and again from a second worker attached afterwards (it reads the service's memory);
  - unload gives the service's GPU memory back.
It prints a table and exits non-zero if a check fails.

    python bench/gpu_check.py [--params-m 120] [--steps 5]
    python bench/gpu_check.py --rehearse-on-cpu   # the same flow on CPU (float32), for
                                                  # checking the script where no GPU is
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, llama, llama_checkpoint, reference_model, server, wait_ready

SPECS = ["bf16", "nf4"]
TOKENS = [[1, 15, 27, 300, 400, 9, 81, 2, 640, 77, 5, 120]]  # < 1000: fits every vocab here
MiB = 2**20


def base_tensors(model: Any) -> list[Any]:
    from service.memory.footprint import all_tensors

    return [t for _, t in all_tensors(model) if t.numel()]


def _bytes(tensor: Any) -> bytes:
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).cpu().numpy().tobytes())


def sha256_of(tensors: list[Any]) -> str:
    digest = hashlib.sha256()
    seen = set()
    for tensor in sorted(tensors, key=lambda t: t.data_ptr()):
        key = (tensor.data_ptr(), tensor.numel(), str(tensor.dtype))
        if key not in seen:
            seen.add(key)
            digest.update(_bytes(tensor))
    return digest.hexdigest()


def spec(name: str, device: str) -> dict[str, Any]:
    """The load request; on CPU (rehearsal) float32 stands in for bf16, which is slow there."""
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    body: dict[str, Any] = {"device_map": device, "dtype": dtype}
    if name == "nf4":
        body["quantization"] = {"method": "bnb-4bit", "quant_type": "nf4", "compute_dtype": dtype}
    return body


def device_memory(device: Any) -> tuple[int, int]:
    """(caching-allocator bytes, device free bytes); zeros on CPU."""
    import torch

    if device.type != "cuda":
        return 0, 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device), torch.cuda.mem_get_info(device)[0]


def worker_main(url: str, model_id: str, steps: int, logits_out: str, where: str) -> None:
    """An independent worker: attach, measure, forward, train LoRA, checksum."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from service.client import Client

    device = torch.device(where)
    torch.zeros(1, device=device)  # CUDA context first: it is not the model's memory
    allocated_before, free_before = device_memory(device)
    start = time.perf_counter()
    result: dict[str, Any] = {}
    with Client(url).attach(model_id, holder="gpu-check", ttl_seconds=60) as model:
        base = base_tensors(model)
        allocated_after, free_after = device_memory(device)
        result["attach_ms"] = (time.perf_counter() - start) * 1000
        result["allocated_growth"] = allocated_after - allocated_before
        result["free_drop"] = free_before - free_after
        storages = {t.untyped_storage().data_ptr() for t in base}
        result["base_tensors"] = len(base)
        result["on_device"] = sum(t.device == device for t in base)
        result["storages"] = len(storages)
        pointers = {t.data_ptr() for t in base}
        result["sha_before"] = sha256_of(base)
        tokens = torch.tensor(TOKENS, device=device)
        with torch.no_grad():
            logits = model(tokens).logits.float()
        save_file({"logits": logits.cpu().contiguous()}, logits_out)
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
            result["trainable"] = sum(p.numel() for p in trainable)
            del lora, optimizer
    print(json.dumps(result), flush=True)


def run_worker(
    url: str, model_id: str, steps: int, logits_out: Path, device: str
) -> dict[str, Any]:
    args = [url, model_id, str(steps), str(logits_out), device]
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


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


def service_gpu(http: Any) -> int:
    devices = http.get("/v1/memory").json()["devices"]
    return int(devices[0]["torch_reserved_bytes"]) if devices else 0


def check(name: str, path: Path, http: Any, work: Path, steps: int, device: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    expected = reference_logits(path, name, device)
    reserved_before = service_gpu(http)
    body = {"source": str(path), **spec(name, device)}
    status = wait_ready(http, http.post("/v1/models", json=body).json()["id"])
    if not status["shareable"]:
        raise RuntimeError(f"{name}: not shareable: {status['shareable_reason']}")
    model_id = str(status["id"])
    model_bytes = int(status["memory"]["by_device"].get(device, 0))
    reserved_held = service_gpu(http)
    url = str(http.base_url)
    first = run_worker(url, model_id, steps, work / f"{name}-1.safetensors", device)
    second = run_worker(url, model_id, 0, work / f"{name}-2.safetensors", device)
    got = load_file(str(work / f"{name}-1.safetensors"))["logits"]
    again = load_file(str(work / f"{name}-2.safetensors"))["logits"]
    unloaded = http.delete(f"/v1/models/{model_id}").status_code
    time.sleep(0.5)
    reserved_after = service_gpu(http)
    diff = float((got - expected).abs().max())
    on_gpu = device.startswith("cuda")
    row = {
        "spec": name if on_gpu or name != "bf16" else "bf16 (float32 on CPU)",
        "model_mib": model_bytes / MiB,
        "service_reserved_mib": (reserved_before, reserved_held, reserved_after),
        "attach_ms": first["attach_ms"],
        "worker_alloc_mib": first["allocated_growth"] / MiB,
        "worker_free_drop_mib": first["free_drop"] / MiB,
        "in_segment": f"{first['on_device']}/{first['base_tensors']} on {device}, "
        f"{first['storages']} storage(s)",
        "logits_max_diff": diff,
        "losses": (first["losses"][0], first["losses"][-1]),
        "checks": {
            "every base tensor is on the model's device": first["on_device"]
            == first["base_tensors"],
            "logits match from_pretrained": torch.allclose(got, expected, atol=2e-2, rtol=2e-2),
            "LoRA lowered the loss": first["losses"][-1] < first["losses"][0],
            "adapter output changed": first["adapter_changed"],
            "base tensors never moved": first["pointers_kept"],
            "base bytes unchanged by training": first["sha_before"] == first["sha_after"],
            "a second worker reads the same bytes": second["sha_before"] == first["sha_before"],
            "second worker's logits are identical": torch.equal(got, again),
            "unload answered 204": unloaded == 204,
        },
    }
    if on_gpu:
        row["checks"].update(
            {
                "one IPC storage holds every base tensor": first["storages"] == 1,
                "worker allocated < 1% of the model": first["allocated_growth"]
                < 0.01 * model_bytes,
                "device free memory fell < 10% of the model": first["free_drop"]
                < 0.1 * model_bytes,
                "service GPU memory returned": reserved_after
                <= reserved_before + 0.05 * model_bytes,
            }
        )
    return row


def main() -> int:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=120)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rehearse-on-cpu", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a ~3M-param Llama (for tests)")
    args = parser.parse_args()
    device = "cpu" if args.rehearse_on_cpu else "cuda:0"
    if device != "cpu" and not torch.cuda.is_available():
        print(
            "gpu_check needs a CUDA GPU; this machine has none (--rehearse-on-cpu runs the "
            "same flow on CPU)",
            file=sys.stderr,
        )
        return 2
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="basehold-gpu-check-"))
    path = work / "models" / "llama-check"
    if args.tiny:
        llama(path, hidden=256, layers=2, vocab=4000, heads=8)
    else:
        llama_checkpoint(path, args.params_m)
    rows = []
    env = {"BASEHOLD_MODEL_ROOTS": json.dumps([str(path.parent)])}
    try:
        with server(work, **env) as http:
            for name in SPECS:
                rows.append(check(name, path, http, work, args.steps, device))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    where = torch.cuda.get_device_name(0) if device != "cpu" else "CPU (rehearsal, float32)"
    print(
        f"\nbasehold gpu_check: Llama ~{args.params_m}M params on {where}, {args.steps} LoRA steps"
    )
    print(
        "\n| spec | model on the device (MiB) | attach (ms) | worker allocator growth (MiB) "
        "| device free drop in worker (MiB) | base tensors | logits max abs diff vs "
        "from_pretrained | LoRA loss first -> last | service reserved before / held / after "
        "unload (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        before, held, after = (x / MiB for x in row["service_reserved_mib"])
        print(
            f"| {row['spec']} | {row['model_mib']:.0f} | {row['attach_ms']:.0f} | "
            f"{row['worker_alloc_mib']:.2f} | {row['worker_free_drop_mib']:.0f} | "
            f"{row['in_segment']} | {row['logits_max_diff']:.3g} | "
            f"{row['losses'][0]:.3f} -> {row['losses'][1]:.3f} | "
            f"{before:.0f} / {held:.0f} / {after:.0f} |"
        )
    failed = 0
    print()
    for row in rows:
        for what, ok in row["checks"].items():
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {row['spec']}: {what}")
    print(f"\n{failed} check(s) failed; {time.perf_counter() - began:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(ROOT))
        worker_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        sys.exit(main())
