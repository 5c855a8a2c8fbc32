"""A training worker: attach to a model held by basehold and train a LoRA adapter on it.

The base weights are the service's own memory pages (read-only, zero-copy); only the
adapter lives in this process. Runs where it can reach the service's arena socket
(BASEHOLD_SOCKET's folder, shared with the service's container).

    BASEHOLD_URL=http://127.0.0.1:8000 python examples/train_lora.py --model demo \\
        --targets q_proj v_proj --steps 20 --out ./adapter
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from peft import LoraConfig, get_peft_model

from service.client import Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=os.environ.get("BASEHOLD_MODEL", "demo"))
    parser.add_argument("--url", default=os.environ.get("BASEHOLD_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("BASEHOLD_TOKEN"))
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("ADAPTER_DIR", "./adapter"))
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for ready")
    args = parser.parse_args()

    client = Client(args.url, token=args.token)
    client.wait(args.model, timeout=args.wait)
    holder = f"{os.uname().nodename}-{os.getpid()}"
    with client.attach(args.model, holder=holder, ttl_seconds=30) as base:
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16,
                                                target_modules=args.targets))
        model.print_trainable_parameters()
        device = next(model.parameters()).device
        vocab = base.config.vocab_size
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        for step in range(args.steps):
            tokens = torch.randint(0, vocab, (4, 64), device=device)  # bring your data here
            start = time.perf_counter()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.2f}s)",
                  flush=True)
        model.save_pretrained(args.out)
        print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
