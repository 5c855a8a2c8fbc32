"""One rank of a `torchrun --nproc_per_node N` LoRA job on the CPU (DistributedDataParallel
over gloo), as training jobs run.

    torchrun --standalone --nproc_per_node 2 tests/worker/ddp_worker.py \
        URL MODEL_ID SOURCE OUT MODE

MODE `basehold`: every rank attaches the held model three times in a row and trains each
under another DDP wrapper, none with `lease_callback`: DistributedDataParallel written by
hand, accelerate's `Accelerator.prepare`, a plain `Trainer`. MODE `trainer`: one attach,
the Trainer only. MODE `plain`: every rank calls `from_pretrained` and trains under the
Trainer (the baseline). Each rank writes
OUT/<mode>-rank-<rank>.json (not stdout: torchrun interleaves its ranks' lines): per
wrapper, how many of the arena's pages became the rank's own, the model's bytes, the
losses and a checksum of the adapters (equal on every rank when they synced); and the
rank's private memory growth over the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, get_peft_model
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from service.worker.client import Client
from service.worker.ddp import copied_bytes
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


WRAPPERS = ("ddp", "accelerate", "trainer")
STEPS = 3


def _lora(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))


def _adapters(model: nn.Module) -> float:
    return float(
        sum(p.detach().double().abs().sum() for n, p in model.named_parameters() if "lora_" in n)
    )


def _batch(step: int) -> dict[str, torch.Tensor]:
    """Another batch on each rank: the adapters agree only if their gradients synced."""
    ids = Tokens()[2 * step + int(os.environ["RANK"])]["input_ids"][None]
    return {"input_ids": ids, "labels": ids}


def by_hand(lora: nn.Module, out: Path) -> list[float]:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    wrapped = DistributedDataParallel(lora)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(STEPS):
        loss = wrapped(**_batch(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def by_accelerate(lora: nn.Module, out: Path) -> list[float]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    wrapped, optimizer = accelerator.prepare(lora, optimizer)
    assert isinstance(wrapped, DistributedDataParallel), type(wrapped)
    losses = []
    for step in range(STEPS):
        loss = wrapped(**_batch(step)).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def by_trainer(lora: nn.Module, out: Path) -> list[float]:
    args = TrainingArguments(
        output_dir=str(out / f"rank-{os.environ['RANK']}"),
        max_steps=STEPS,
        **CPU_TRAINING,
        ddp_backend="gloo",
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=lora, args=args, train_dataset=Tokens())
    trainer.train()
    assert isinstance(trainer.model_wrapped, DistributedDataParallel), type(trainer.model_wrapped)
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


TRAIN = {"ddp": by_hand, "accelerate": by_accelerate, "trainer": by_trainer}


def main(url: str, model_id: str, source: str, out: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    before = private_bytes()
    runs = []
    client = Client(url)
    for wrapper in WRAPPERS if mode == "basehold" else ("trainer",):
        if mode != "plain":
            with client.attach(model_id, holder=f"rank-{rank}-{wrapper}", ttl_seconds=60) as model:
                lora = _lora(model)
                losses = TRAIN[wrapper](lora, Path(out))
                copied = copied_bytes(*cast(tuple[int, int], model.basehold_arena))
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            model.requires_grad_(False)
            lora = _lora(model)
            losses = TRAIN[wrapper](lora, Path(out))
            copied = 0
        runs.append(
            {
                "wrapper": wrapper,
                "arena_copied": copied,
                "model_bytes": sum(
                    t.numel() * t.element_size() for t in model.state_dict().values()
                ),
                "losses": losses,
                "adapters": _adapters(lora),
            }
        )
    mapped, _ = arena_pages()
    result = {
        "rank": rank,
        "mode": mode,
        "private_growth": private_bytes() - before,
        "arena_mapped": mapped,
        "runs": runs,
    }
    (Path(out) / f"{mode}-rank-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:6])
