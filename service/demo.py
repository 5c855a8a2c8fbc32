"""A small generated checkpoint, so a newcomer with no hub access has something real to load:
a randomly initialised Llama with a real tokenizer (a byte-level BPE trained here, offline,
on text shipped with the package) and a generation config, so the README's worker flow
(`client.tokenizer`, `client.attach`, TRL's `SFTTrainer`) runs on it unchanged."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

DEMO_NAME = "demo-llama"
VOCAB = 4096
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def demo_tokenizer() -> Any:
    """A byte-level BPE trained on the bundled corpus (deterministic, a fraction of a
    second), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = resources.files("service.demo_data").joinpath("corpus.txt").read_text("utf-8")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=512, padding_side="right", **SPECIAL
    )


def written(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "tokenizer.json").is_file()


def write_demo_checkpoint(root: Path, name: str = DEMO_NAME) -> Path:
    """Write (once) a randomly initialised ~4M-parameter Llama under `root/name`, with its
    tokenizer and generation config (added to a demo folder written before they were)."""
    target = root / name
    if written(target):
        return target
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = demo_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if not (target / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **ids,
        )
        LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    generation = GenerationConfig(
        **ids, max_new_tokens=64, do_sample=True, temperature=0.8, top_p=0.95
    )
    generation.save_pretrained(target)
    return target


if __name__ == "__main__":
    import sys

    print(write_demo_checkpoint(Path(sys.argv[1])))
