"""The reference models the suite compares with behave the same on every x86 CPU.

bitsandbytes decides per module (`support_avx512bf16_for_cpu`, from `has_avx512bf16()` at
construction) whether to repack 4-bit weights on a no-grad forward. Forcing that decision
on here makes this machine behave like one with AVX512-BF16, whatever its CPU has."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tests.reference import from_pretrained

NF4 = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32,
)
TOKENS = torch.tensor([[1, 2, 3, 4, 5]])


@pytest.fixture
def repack_forced_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def weights_4bit(model: torch.nn.Module) -> dict[str, int]:
    return {
        name: module.weight.data_ptr()
        for name, module in model.named_modules()
        if isinstance(module, bnb_modules.Linear4bit)
    }


@pytest.mark.usefixtures("repack_forced_on")
def test_forced_repack_does_change_a_plain_model(models_root: Path) -> None:
    """The control: with the decision forced on, a plain from_pretrained model repacks (or
    trips bitsandbytes' shape assert), so the next test would catch a missing fix."""
    model = AutoModelForCausalLM.from_pretrained(
        models_root / "llama", quantization_config=NF4, device_map="cpu"
    ).eval()
    before = weights_4bit(model)
    assert before and all(
        m.support_avx512bf16_for_cpu
        for m in model.modules()
        if isinstance(m, bnb_modules.Linear4bit)
    )
    try:
        with torch.no_grad():
            model(TOKENS)
    except AssertionError as exc:
        assert "block_n" in str(exc)
    else:
        assert weights_4bit(model) != before, "forced repack left every weight in place"


@pytest.mark.usefixtures("repack_forced_on")
def test_reference_models_never_repack(models_root: Path) -> None:
    model = from_pretrained(
        AutoModelForCausalLM, models_root / "llama", quantization_config=NF4, device_map="cpu"
    )
    before = weights_4bit(model)
    with torch.no_grad():
        first = model(TOKENS).logits
        second = model(TOKENS).logits
    assert weights_4bit(model) == before
    assert torch.equal(first, second)
    assert not any(
        getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, bnb_modules.Linear4bit)
    )
