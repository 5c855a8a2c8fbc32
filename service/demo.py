"""A small generated checkpoint, so a newcomer with no hub access has something real to load."""

from __future__ import annotations

from pathlib import Path

DEMO_NAME = "demo-llama"


def write_demo_checkpoint(root: Path, name: str = DEMO_NAME) -> Path:
    """Write (once) a randomly initialised ~4M-parameter Llama under `root/name`."""
    target = root / name
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    return target
