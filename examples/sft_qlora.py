"""QLoRA with TRL on a base model basehold holds in 4 bits.

The base weights are the service's own pages (zero-copy, sealed); the tokenizer comes over
HTTP (no shared filesystem); the saved adapter names the base's hub id and revision.

    basehold load meta-llama/Llama-3.2-1B --name llama-q4 --4bit --dtype bfloat16 --wait
    BASEHOLD_URL=http://127.0.0.1:8000 python examples/sft_qlora.py --model llama-q4 \
        --out ./out --resume

How it ends (docs/jobs.md): 0 with the adapter in --out; 75 when the lease is lost (the
model is force-unloaded, the lease revoked or expired): the lease callback has the Trainer
save a checkpoint (--out/checkpoint-N) and stop, and nothing is saved as the final
adapter; run the same command again (with --resume) on a new lease to continue from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from service.client import Client, lease_of
from service.worker.client import ServiceUnreachable
from service.worker.exit_codes import CONFIG, LEASE_LOST

# Bring your data here; a few sentences keep the example self-contained (no hub access).
TEXTS = [
    "basehold keeps one copy of a base model and lends it to every training job on the node.",
    "Low-rank adapters train a few million weights on top of a frozen base model.",
    "A lease has a time to live, so a worker that dies never pins memory for long.",
    "Quantized bases in four bits make large models fit where they would not otherwise.",
]


def load_tokenizer(client: Client, model_id: str) -> Any:
    """The checkpoint's own tokenizer, or exit CONFIG naming the setting to change."""
    try:
        return client.tokenizer(model_id)  # over HTTP into BASEHOLD_CACHE, no shared filesystem
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=os.environ.get("BASEHOLD_MODEL", "llama-q4"))
    parser.add_argument("--url", default=os.environ.get("BASEHOLD_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("BASEHOLD_TOKEN"))
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("ADAPTER_DIR", "./out"))
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in --out (starts afresh without one)",
    )
    parser.add_argument("--ttl", type=int, default=60, help="the lease's time to live (s)")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()  # else train on the CPU, in float32
    client = Client(args.url, token=args.token)
    tokenizer = load_tokenizer(client, args.model)  # before leasing anything
    last = get_last_checkpoint(args.out) if args.resume and os.path.isdir(args.out) else None
    # Waits for ready; the holder defaults to host-pid.
    with client.attach(args.model, ttl_seconds=args.ttl) as model:
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
            # A lost lease: a checkpoint (--out/checkpoint-N) and a stop at the step's end.
            callbacks=[client.lease_callback(model)],
        )
        if last is not None:
            print(f"resuming from {last}")
        trainer.train(resume_from_checkpoint=last)
        lease = lease_of(model)
        if lease.lost:  # the checkpoint is saved; the adapter is not final
            print(
                f"lease lost ({lease.reason}: {lease.detail}) at step "
                f"{trainer.state.global_step} of {args.max_steps}; checkpoint saved in "
                f"{args.out}. Run again with --resume on a new lease (exit {LEASE_LOST}).",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(LEASE_LOST)
        trainer.save_model(args.out)  # adapter_config names the hub id + revision
    print(f"adapter saved to {args.out} after {trainer.state.global_step} steps")


if __name__ == "__main__":
    main()
