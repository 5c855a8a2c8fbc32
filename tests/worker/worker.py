"""A training worker, run as an independent process (not a fork of the server).

    python -m tests.worker.worker URL MODEL_ID MODE SPEC_JSON

Modes: `train` attaches, compares logits with its own from_pretrained of the same spec,
trains LoRA steps and checks base tensors never left the arena; `hold` attaches, says
"attached", waits for a line on stdin, then runs a forward pass (and `steps` LoRA steps);
`write` attaches and writes into every base weight in place (copy-on-write: only this
worker sees it). Prints one JSON line of results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.loader.footprint import all_tensors
from service.loader.resident import file_ranges
from service.worker.client import Client
from tests.reference import from_pretrained


def mapped_arena() -> str:
    """The memfd arena this process maps, as /proc/self/maps names it."""
    return next(
        line.split(maxsplit=5)[5].removesuffix(" (deleted)")
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "/memfd:basehold:" in line
    )


def outside_arena(model: nn.Module, arena: str) -> list[str]:
    ranges = file_ranges([Path(arena)])
    return [
        name
        for name, tensor in all_tensors(model)
        if "lora_" not in name
        and tensor.numel()
        and not any(tensor.data_ptr() in r for r in ranges)
    ]


def reference(spec: dict[str, Any]) -> nn.Module:
    import transformers

    kwargs: dict[str, Any] = {"dtype": getattr(torch, spec.get("dtype", "float32"))}
    quant = spec.get("quantization")
    if quant:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=quant.get("double_quant", False),
            bnb_4bit_compute_dtype=torch.float32,
        )
    auto = getattr(transformers, spec["auto_class"])
    if spec.get("num_labels"):
        kwargs["num_labels"] = spec["num_labels"]
    return from_pretrained(auto, spec["source"], device_map="cpu", **kwargs)


def output(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    result = model(input_ids=tokens)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def train(client: Client, model_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    tokens = torch.tensor([[1, 5, 9, 42, 7, 3]])
    lease_arena = client.get(model_id)
    with client.attach(model_id, holder="worker-train", ttl_seconds=30) as model:
        arena = mapped_arena()
        with torch.no_grad():
            ours = output(model, tokens)
            theirs = output(reference(spec), tokens)
        identical = bool(torch.equal(ours, theirs))
        tied = spec.get("tied") and model.lm_head.weight is model.get_input_embeddings().weight
        peft_model = lora_steps(model, spec["targets"], tokens, 3)
        with torch.no_grad():
            adapted = output(peft_model, tokens)
        return {
            "identical": identical,
            "tied": bool(tied),
            "adapter_changed": not torch.equal(adapted, ours),
            "outside_arena": outside_arena(peft_model, arena),
            "arena": arena,
            "leases_while_attached": client.get(model_id)["leases"],
            "state": lease_arena["state"],
        }


def lora_steps(model: nn.Module, targets: list[str], tokens: torch.Tensor, steps: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = output(peft_model, tokens).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model


def main() -> None:
    url, model_id, mode, spec_json = sys.argv[1:5]
    spec = json.loads(spec_json)
    client = Client(url, token=spec.get("token"))
    if mode == "train":
        print(json.dumps(train(client, model_id, spec)), flush=True)
    elif mode == "hold":
        with client.attach(model_id, holder="worker-hold", ttl_seconds=spec["ttl"]) as model:
            print("attached", flush=True)
            sys.stdin.readline()
            tokens = torch.tensor([[1, 2, 3]])
            with torch.no_grad():
                total = float(output(model, tokens).sum())
            if spec.get("steps"):
                lora_steps(model, ["q_proj", "v_proj"], tokens, spec["steps"])
        print(json.dumps({"forward_sum": total}), flush=True)
    elif mode == "write":
        tokens = torch.tensor([[1, 2, 3]])
        attached = client.attach(model_id, holder="worker-write", ttl_seconds=30)
        with attached as model, torch.no_grad():
            before = output(model, tokens)
            for parameter in model.parameters():
                parameter.add_(1.0)
            changed = not torch.equal(output(model, tokens), before)
        print(json.dumps({"changed": changed}), flush=True)


if __name__ == "__main__":
    main()
