"""A training worker: attach to a model held by basehold and train a LoRA adapter on it with
a plain PEFT loop, on real text tokenized by the served tokenizer.

The base weights are the service's own memory pages (sealed, zero-copy); only the adapter
lives in this process. Runs where it can reach the service's arena socket
(BASEHOLD_SOCKET's folder, shared with the service's container).

    BASEHOLD_URL=http://127.0.0.1:8000 python examples/train_lora.py --model demo \\
        --targets q_proj v_proj --steps 20 --out ./adapter
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from service.client import Client

# Bring your data here (a file with --text); these lines keep the example self-contained.
TEXT = """basehold loads a pretrained base model once per node and keeps it resident.
Training workers lease it and get a module whose frozen weights are the service's pages.
Only the adapter lives in the worker: four jobs on one base cost one copy of the base.
A lease has a time to live; a worker that dies stops renewing and never pins memory.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=os.environ.get("BASEHOLD_MODEL", "demo"))
    parser.add_argument("--url", default=os.environ.get("BASEHOLD_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("BASEHOLD_TOKEN"))
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--text", help="a text file to train on")
    parser.add_argument("--out", default=os.environ.get("ADAPTER_DIR", "./adapter"))
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for ready")
    args = parser.parse_args()

    client = Client(args.url, token=args.token)
    text = Path(args.text).read_text() if args.text else TEXT
    with client.attach(args.model, ttl_seconds=30, wait=args.wait) as base:
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=args.targets))
        model.print_trainable_parameters()
        device = next(model.parameters()).device
        try:
            tokenizer = client.tokenizer(args.model)  # the checkpoint's, over HTTP
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
            lines = [line for line in text.splitlines() if line.strip()]
            batch = tokenizer(
                lines, return_tensors="pt", padding=True, truncation=True, max_length=64
            )
            tokens = batch["input_ids"].to(device)
            labels = tokens.masked_fill(batch["attention_mask"].to(device) == 0, -100)
        except Exception as exc:  # a checkpoint without a tokenizer (the --demo one)
            print(f"no tokenizer served ({exc}); training on random tokens")
            tokens = torch.randint(0, base.config.vocab_size, (4, 64), device=device)
            labels = tokens
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        for step in range(args.steps):
            start = time.perf_counter()
            loss = model(input_ids=tokens, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(
                f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.2f}s)",
                flush=True,
            )
        model.save_pretrained(args.out)
        print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
