"""The --demo checkpoint: a generated Llama with a real tokenizer and generation config."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from service.demo import DEMO_NAME, write_demo_checkpoint


def test_the_demo_has_a_tokenizer_that_round_trips_and_agrees_with_its_config(
    tmp_path: Path,
) -> None:
    path = write_demo_checkpoint(tmp_path)
    assert path == tmp_path / DEMO_NAME
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "Hello world, this is basehold. Train an adapter on it!"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges learned from the bundled text
    config = AutoConfig.from_pretrained(path)
    assert len(tokenizer) <= config.vocab_size
    generation = GenerationConfig.from_pretrained(path)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(generation, name) == getattr(tokenizer, name) == getattr(config, name)
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"


def test_a_demo_written_before_it_had_a_tokenizer_gets_one_and_keeps_its_weights(
    tmp_path: Path,
) -> None:
    path = write_demo_checkpoint(tmp_path)
    weights = (path / "model.safetensors").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (path / name).unlink()
    assert write_demo_checkpoint(tmp_path) == path
    assert (path / "model.safetensors").read_bytes() == weights
    assert json.loads((path / "generation_config.json").read_text())["do_sample"] is True
    assert AutoTokenizer.from_pretrained(path)("hello")["input_ids"]
