"""The worker of the two-container smoke run (fed to `python3 -` in a second container of
the image: another uid, its own PID namespace, only the socket folder shared). Attaches to
MODEL at URL, prints its logits for fixed tokens and three LoRA losses as one JSON line."""

from __future__ import annotations

import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model

from service.client import Client

TOKENS = [[1, 15, 27, 300, 400, 9, 81, 2]]


def main(url: str, model_id: str) -> None:
    with Client(url).attach(model_id, ttl_seconds=30, wait=120) as model:
        tokens = torch.tensor(TOKENS)
        with torch.no_grad():
            logits = model(tokens).logits
        lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(3):
            loss = lora(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
    result = {"uid": os.getuid(), "pid": os.getpid(), "logits": logits.tolist(), "losses": losses}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
