"""A training worker that uses the Hugging Face stack the way an ML engineer would, run as an
independent process (its own HF_HOME and working directory, no view of the server's files).

    python -m tests.worker.hf_worker URL MODEL_ID MODE OUT_DIR [JSON]

Modes:
- `files`: the tokenizer and generation config over HTTP; writes what they say.
- `sft`: TRL SFTTrainer with a LoRA config on the attached model, a few steps, saves the
  adapter and the PEFT model's logits; reports which LoRA layer class PEFT chose.
- `merge`: LoRA with non-zero weights, then merge_and_unload(); logits of both.
- `lost`: a Trainer with the lease callback; the test force-unloads the model while it
  trains; then a forward pass with on_lost="raise".
Prints one JSON line of results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from service.worker.client import Client, LeaseLost, lease_of

TEXTS = [
    "basehold keeps one copy of a base model and lends it to every training job.",
    "Low-rank adapters train a few million weights on top of a frozen base.",
    "A lease has a time to live, so a dead worker never pins memory.",
    "The quick brown fox jumps over the lazy dog.",
    "Quantized bases in four bits make large models fit on one device.",
    "Tokenizers turn text into the ids a model reads.",
] * 4
TOKENS = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])


def files(client: Client, model_id: str, out: Path) -> dict[str, Any]:
    tokenizer = client.tokenizer(model_id)
    generation = client.generation_config(model_id)
    return {
        "ids": tokenizer("Hello world, this is basehold.")["input_ids"],
        "tokenizer_class": type(tokenizer).__name__,
        "generation": generation.to_diff_dict(),
        "cache": str(tokenizer.name_or_path),
    }


# TrainingArguments of every CPU test run: small batches, a log line per step, no saves.
CPU_TRAINING: dict[str, Any] = {
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": [],
    "use_cpu": True,
}


def sft(client: Client, model_id: str, out: Path, spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer = client.tokenizer(model_id)
    with client.attach(model_id, ttl_seconds=30) as model:
        quantized = bool(getattr(model, "is_loaded_in_4bit", False))
        args = SFTConfig(
            output_dir=str(out / "run"),
            max_steps=spec.get("steps", 3),
            **CPU_TRAINING,
            bf16=False,
            max_length=32,
            gradient_checkpointing=False,
        )
        trainer = SFTTrainer(
            model=model,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            train_dataset=Dataset.from_dict({"text": TEXTS}),
            args=args,
            callbacks=[client.lease_callback(model)],
        )
        trainer.train()
        trainer.save_model(str(out / "adapter"))
        peft_model: Any = trainer.model
        peft_model.eval()
        q_proj = peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
        with torch.no_grad():
            logits = peft_model(input_ids=TOKENS).logits
        save_file({"logits": logits.contiguous()}, str(out / "logits.safetensors"))
        return {
            "quantized": quantized,
            "quantization_config": model.config.to_dict().get("quantization_config"),
            "hf_quantizer": type(getattr(model, "hf_quantizer", None)).__name__,
            "lora_layer": f"{type(q_proj).__module__}.{type(q_proj).__name__}",
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        }


def small_random_lora(model: Any) -> Any:
    """A LoRA adapter with small non-zero weights (seeded): what a few steps would leave."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
    return peft_model


def merge(client: Client, model_id: str, out: Path, spec: dict[str, Any]) -> dict[str, Any]:
    with client.attach(model_id, ttl_seconds=30) as model:
        peft_model = small_random_lora(model)
        with torch.no_grad():
            adapted = peft_model(input_ids=TOKENS).logits
            merged_model = peft_model.merge_and_unload()
            merged = merged_model(input_ids=TOKENS).logits
        save_file({"merged": merged.contiguous()}, str(out / "merged.safetensors"))
        with client.attach(model_id, ttl_seconds=30) as fresh, torch.no_grad():
            base = fresh(input_ids=TOKENS).logits
        return {
            "max_diff": float((merged - adapted).abs().max()),
            "scale": float(adapted.abs().max()),
            "merged_differs_from_base": not torch.equal(merged, base),
        }


def lost(client: Client, model_id: str, out: Path, spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Announce(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                print("training", flush=True)
                sys.stdin.readline()  # the test force-unloads the model, then answers

    tokens = TOKENS.repeat(2, 1)
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    with client.attach(model_id, ttl_seconds=3, on_lost="raise") as model:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
        args = TrainingArguments(
            output_dir=str(out / "run"),
            max_steps=100_000,
            per_device_train_batch_size=2,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            logging_steps=1_000_000,
        )
        trainer = Trainer(
            model=peft_model,
            args=args,
            train_dataset=dataset,
            callbacks=[Announce(), client.lease_callback(model)],
        )
        trainer.train()
        lease = lease_of(model)
        raised = False
        try:
            with torch.no_grad():
                model(input_ids=TOKENS)
        except LeaseLost:
            raised = True
        checkpoints = sorted(p.name for p in (out / "run").glob("checkpoint-*"))
        return {
            "stopped_at": trainer.state.global_step,
            "checkpoints": checkpoints,
            "lost": lease.lost,
            "state": lease.state,
            "raised": raised,
        }


def main() -> None:
    url, model_id, mode, out = sys.argv[1:5]
    spec = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    client = Client(url)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode == "files":
        result = files(client, model_id, out_dir)
    else:
        result = {"sft": sft, "merge": merge, "lost": lost}[mode](client, model_id, out_dir, spec)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
