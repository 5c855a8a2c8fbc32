"""One rank of a `torchrun --nproc_per_node N` LoRA job on the CPU, trained by the
transformers Trainer (DistributedDataParallel over gloo), as training jobs run.

    torchrun --standalone --nproc_per_node 2 tests/worker/ddp_worker.py \
        URL MODEL_ID SOURCE OUT MODE

MODE `basehold`: every rank attaches the held model; `plain`: every rank calls
`from_pretrained` (the baseline). Each rank writes OUT/<mode>-rank-<rank>.json (not
stdout: torchrun interleaves its ranks' lines): its private memory growth, whether the
arena is mapped and how many of its pages became private, the model's bytes, the losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from service.worker.client import Client
from tests.worker.hf_worker import CPU_TRAINING

ROOT = Path(__file__).resolve().parents[2]


def private_bytes() -> int:
    """This process's own memory: private pages, less the arena's pages only this rank
    happens to map (shared memory the service holds, not a copy; copies count, see
    `arena_pages`)."""
    fields = Path("/proc/self/smaps_rollup").read_text().split("\n")
    private = 1024 * sum(
        int(line.split()[1])
        for line in fields
        if line.startswith(("Private_Clean", "Private_Dirty"))
    )
    return private - _arena_field("Private_Dirty") - _arena_field("Private_Clean")


def _arena_field(field: str) -> int:
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:
            inside = "/memfd:basehold:" in line
        elif inside and line.startswith(field + ":"):
            total += 1024 * int(line.split()[1])
    return total


def arena_pages() -> tuple[bool, int]:
    """(an arena is mapped, bytes of it that are this process's own: copied on write). A
    copied page of a private file mapping is an anonymous page (smaps `Anonymous`);
    `Private_Dirty` would also count arena pages only this process happens to map (the
    service holds arenas by fd and maps none of them)."""
    mapped = "/memfd:basehold:" in Path("/proc/self/maps").read_text()
    return mapped, _arena_field("Anonymous")


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(index, index + 32) % 400 + 3
        return {"input_ids": ids, "labels": ids}


def launch(
    url: str, model_id: str, source: Path, out: Path, mode: str, timeout: float | None = None
) -> list[dict[str, Any]]:
    """`torchrun --standalone --nproc_per_node 2` of this file; each rank's result, by
    rank. Raises RuntimeError with the output's tail if torchrun fails."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        __file__,
        *(url, model_id, str(source), str(out), mode),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        command, cwd=out, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr)[-6000:])
    files = sorted(out.glob(f"{mode}-rank-*.json"))
    return sorted((json.loads(f.read_text()) for f in files), key=lambda r: int(r["rank"]))


def main(url: str, model_id: str, source: str, out: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    before = private_bytes()
    client = Client(url)
    callbacks: list[Any] = []
    if mode == "basehold":
        attached = client.attach(model_id, holder=f"rank-{rank}", ttl_seconds=60)
        model = attached.__enter__()
        callbacks.append(client.lease_callback(model))
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        model.requires_grad_(False)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=str(Path(out) / f"rank-{rank}"),
        max_steps=3,
        **CPU_TRAINING,
        ddp_backend="gloo",
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=lora, args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train()
    mapped, arena_private = arena_pages()
    result = {
        "rank": rank,
        "mode": mode,
        "device": str(trainer.args.device),
        "private_growth": private_bytes() - before,
        "arena_mapped": mapped,
        "arena_private": arena_private,
        "model_bytes": model_bytes,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }
    (Path(out) / f"{mode}-rank-{rank}.json").write_text(json.dumps(result))
    if mode == "basehold":
        attached.__exit__(None, None, None)


if __name__ == "__main__":
    main(*sys.argv[1:6])
