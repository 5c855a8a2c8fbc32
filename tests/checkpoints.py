"""Tiny checkpoints generated with transformers configs + save_pretrained (no hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Dinov2Config,
    Dinov2Model,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)


def _save(model: PreTrainedModel, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def llama(
    path: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 1000,
    heads: int = 4,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    model: Any = LlamaForCausalLM(config)
    return _save(model.to(dtype), path)


def llama_100m(path: Path) -> Path:
    """~95M parameters (~380 MB in float32): big enough that a leak shows in RSS."""
    return llama(path, hidden=768, layers=10, vocab=16000, heads=12)


def gpt2(path: Path) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=500,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _save(GPT2LMHeadModel(config), path)


def _built(path: Path, model_class: Any, config_class: Any, **settings: Any) -> Path:
    """A model of `model_class`, seeded, from `config_class(**settings)` (keywords the config
    classes take through **kwargs, as transformers documents them), saved at `path`."""
    torch.manual_seed(0)
    return _save(model_class(config_class(**settings)), path)


def t5(path: Path) -> Path:
    return _built(
        path,
        T5ForConditionalGeneration,
        T5Config,
        vocab_size=500,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )


def bert_cls(path: Path) -> Path:
    return _built(
        path,
        BertForSequenceClassification,
        BertConfig,
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=3,
    )


def dinov2(path: Path, *, swiglu: bool = True) -> Path:
    """`swiglu`: a checkpoint transformers converts as it loads: each layer's
    `mlp.weights_in` is split into `gate_proj` and `up_proj` (a `WeightConverter`, not a
    renaming). Without it, the same model type's tensors are only renamed."""
    return _built(
        path,
        Dinov2Model,
        Dinov2Config,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        use_swiglu_ffn=swiglu,
    )


def mixtral(path: Path) -> Path:
    """Two experts a layer, saved one tensor per expert: transformers fuses them as it loads."""
    return _built(
        path,
        MixtralForCausalLM,
        MixtralConfig,
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
    )


def llama_with_tokenizer(path: Path, tokenizer_from: Path) -> Path:
    """A tiny Llama that ships a real tokenizer (copied from `tokenizer_from`, the MiniLM
    checkpoint) and a generation config of its own: eos [2, 0], sampling settings."""
    import json
    import shutil

    vocab = sum(1 for _ in (tokenizer_from / "vocab.txt").open())
    llama(path, hidden=32, layers=2, vocab=vocab, heads=4)
    for name in ("tokenizer.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(tokenizer_from / name, path / name)
    # A causal LM's tokenizer names its sequence ends (TRL appends eos to every example).
    tokenizer_config = json.loads((tokenizer_from / "tokenizer_config.json").read_text())
    tokenizer_config.update(bos_token="[CLS]", eos_token="[SEP]")
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    generation = {
        "bos_token_id": 1,
        "eos_token_id": [2, 0],
        "pad_token_id": 0,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 17,
    }
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def hub_cache_repo(cache: Path, repo_id: str, source: Path, commit: str) -> Path:
    """Lay `source`'s files out as the HF hub cache does (blobs, a snapshot of symlinks,
    refs/main): what huggingface_hub finds offline."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            blob = blobs / f"blob-{file.name}"
            shutil.copy(file, blob)
            (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot
