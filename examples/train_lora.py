"""A training worker: attach to a model held by basehold and train a LoRA adapter on it with
a plain PEFT loop, on real text tokenized by the served tokenizer.

The base weights are the service's own memory pages (sealed, zero-copy); only the adapter
lives in this process. Runs where it can reach the service's arena socket
(BASEHOLD_SOCKET's folder, shared with the service's container).

    BASEHOLD_URL=http://127.0.0.1:8000 python examples/train_lora.py --model demo \\
        --targets q_proj v_proj --steps 20 --out ./adapter --resume

How it ends (docs/jobs.md): 0 with the adapter in --out, its adapter_config.json naming
the base and its revision; 75 (a lost lease) with a resumable checkpoint in
--out/checkpoint-N, never the final adapter: run the same command again (with --resume)
on a new lease; 78 when the model's tokenizer cannot be loaded (it never trains on
anything else).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from service.client import Client, LeaseLost, lease_of
from service.worker.client import ServiceUnreachable
from service.worker.exit_codes import CONFIG, LEASE_LOST

# Bring your data here (a file with --text); these lines keep the example self-contained.
TEXT = """basehold loads a pretrained base model once per node and keeps it resident.
Training workers lease it and get a module whose frozen weights are the service's pages.
Only the adapter lives in the worker: four jobs on one base cost one copy of the base.
A lease has a time to live; a worker that dies stops renewing and never pins memory.
"""


def load_tokenizer(client: Client, model_id: str, wait: float) -> Any:
    """The checkpoint's own tokenizer, or exit CONFIG: random or foreign tokens would train
    an adapter that is worthless and looks fine."""
    try:
        return client.tokenizer(model_id, wait=wait)  # over HTTP, into BASEHOLD_CACHE
    except ServiceUnreachable:
        raise
    except (OSError, ValueError) as exc:
        cache = os.environ.get("BASEHOLD_CACHE") or "$HOME/.cache/basehold"
        print(
            f"cannot load the tokenizer of {model_id!r}: {exc}\n"
            f"Refusing to train without it. Its files are fetched into BASEHOLD_CACHE "
            f"({cache}): set BASEHOLD_CACHE to a writable folder (or give the job a writable "
            "HOME), or serve a checkpoint that has tokenizer files.",
            file=sys.stderr,
        )
        sys.exit(CONFIG)


def save_checkpoint(
    model: PeftModel, optimizer: torch.optim.Optimizer, out: Path, step: int
) -> Path:
    """`out/checkpoint-STEP` as the Trainer names them (what `--resume` finds): the adapter,
    the optimizer's state and the steps done. Written beside its name and renamed, so a
    kill while saving never leaves a half checkpoint for the next run to resume."""
    folder = out / f"checkpoint-{step}"
    partial = out / f".checkpoint-{step}.partial"
    model.save_pretrained(str(partial))
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    (partial / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    partial.replace(folder)
    return folder


def resume(model: PeftModel, optimizer: torch.optim.Optimizer, out: Path) -> int:
    """Load the last checkpoint in `out` (if any) into the adapter and optimizer; returns
    the steps it had done (0 without one)."""
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last is None:
        print(f"no checkpoint in {out}: starting at step 0")
        return 0
    folder = Path(last)
    device = str(next(model.parameters()).device)
    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors", device))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    step = int(json.loads((folder / "trainer_state.json").read_text())["global_step"])
    print(f"resuming from {folder} at step {step}")
    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=os.environ.get("BASEHOLD_MODEL", "demo"))
    parser.add_argument("--url", default=os.environ.get("BASEHOLD_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("BASEHOLD_TOKEN"))
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--steps", type=int, default=10, help="steps in all (resumed ones too)")
    parser.add_argument("--text", help="a text file to train on")
    parser.add_argument("--out", default=os.environ.get("ADAPTER_DIR", "./adapter"))
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in --out (starts at step 0 without one)",
    )
    parser.add_argument("--ttl", type=int, default=30, help="the lease's time to live (s)")
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for ready")
    args = parser.parse_args()

    out = Path(args.out)
    client = Client(args.url, token=args.token)
    # Before leasing anything: the model's own tokenizer, or no training at all.
    tokenizer = load_tokenizer(client, args.model, args.wait)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    text = Path(args.text).read_text() if args.text else TEXT
    lines = [line for line in text.splitlines() if line.strip()]
    batch = tokenizer(lines, return_tensors="pt", padding=True, truncation=True, max_length=64)
    # on_lost="raise": a forward after the loss raises LeaseLost on the CPU as on a GPU.
    attached = client.attach(args.model, ttl_seconds=args.ttl, wait=args.wait, on_lost="raise")
    with attached as base:
        # The base the adapter pins: the hub id and the commit the service resolved (for a
        # local checkpoint, its directory and no revision), as the held model reports it.
        provenance: dict[str, Any] = getattr(base, "basehold_provenance", None) or {}
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=args.targets, revision=provenance.get("revision")
        )
        model = get_peft_model(base, config)
        model.peft_config["default"].base_model_name_or_path = (
            provenance.get("hub_id") or provenance.get("source") or base.name_or_path
        )
        model.print_trainable_parameters()
        device = next(model.parameters()).device
        tokens = batch["input_ids"].to(device)
        labels = tokens.masked_fill(batch["attention_mask"].to(device) == 0, -100)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        step = resume(model, optimizer, out) if args.resume else 0
        lease = lease_of(base)
        model.train()
        try:
            # The lease is checked between steps; a loss during one raises LeaseLost from
            # its forward (before any weight changes) or lets its backward finish.
            while step < args.steps and not lease.lost:
                loss = model(input_ids=tokens, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                print(f"step {step}: loss {loss.item():.4f}", flush=True)
                step += 1
        except LeaseLost:
            optimizer.zero_grad()  # the step that raised changed no weight
        if lease.lost:
            # Never the final adapter: a checkpoint that a run on a new lease resumes.
            folder = save_checkpoint(model, optimizer, out, step)
            print(
                f"lease lost ({lease.reason}: {lease.detail}) after {step} of {args.steps} "
                f"steps; checkpoint saved to {folder}. Run again with --resume on a new "
                f"lease (exit {LEASE_LOST}).",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(LEASE_LOST)
        model.save_pretrained(str(out))
        print(f"adapter saved to {out} after {step} steps")


if __name__ == "__main__":
    main()
