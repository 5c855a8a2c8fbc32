"""QLoRA with TRL on a base model basehold holds in 4 bits.

The base weights are the service's own pages (zero-copy, sealed); the tokenizer comes over
HTTP (no shared filesystem); the saved adapter names the base's hub id and revision. If the
lease is lost (the model is force-unloaded), the callback saves a checkpoint and stops.

    basehold load meta-llama/Llama-3.2-1B --name llama-q4 --4bit --dtype bfloat16 --wait
    BASEHOLD_URL=http://127.0.0.1:8000 python examples/sft_qlora.py --model llama-q4 --out ./out
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from service.client import Client

# Bring your data here; a few sentences keep the example self-contained (no hub access).
TEXTS = [
    "basehold keeps one copy of a base model and lends it to every training job on the node.",
    "Low-rank adapters train a few million weights on top of a frozen base model.",
    "A lease has a time to live, so a worker that dies never pins memory for long.",
    "Quantized bases in four bits make large models fit where they would not otherwise.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=os.environ.get("BASEHOLD_MODEL", "llama-q4"))
    parser.add_argument("--url", default=os.environ.get("BASEHOLD_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("BASEHOLD_TOKEN"))
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("ADAPTER_DIR", "./out"))
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()  # else train on the CPU, in float32
    client = Client(args.url, token=args.token)
    tokenizer = client.tokenizer(args.model)  # over HTTP, no shared filesystem
    with client.attach(args.model) as model:  # waits for ready; holder defaults to host-pid
        trainer = SFTTrainer(
            model=model,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=args.targets),
            train_dataset=Dataset.from_dict({"text": TEXTS * 8}),
            args=SFTConfig(
                output_dir=args.out,
                max_steps=args.max_steps,
                per_device_train_batch_size=2,
                learning_rate=2e-4,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                use_cpu=not on_gpu,
                bf16=on_gpu,
                max_length=64,
            ),
            callbacks=[client.lease_callback(model)],  # stops cleanly if the lease is lost
        )
        trainer.train()
        trainer.save_model(args.out)  # adapter_config names the hub id + revision
    print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
