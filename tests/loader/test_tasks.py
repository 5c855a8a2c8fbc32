from __future__ import annotations

import pytest
from transformers import AutoConfig, BertConfig, GPT2Config, LlamaConfig, PretrainedConfig, T5Config

from service.common.errors import WrongModelType
from service.common.load.spec import Task
from service.loader.tasks import infer_task, resolve_task, supported_tasks
from tests.conftest import MINILM


@pytest.mark.parametrize(
    ("config", "task"),
    [
        (LlamaConfig(architectures=["LlamaForCausalLM"]), Task.CAUSAL_LM),
        (GPT2Config(architectures=["GPT2LMHeadModel"]), Task.CAUSAL_LM),
        (T5Config(architectures=["T5ForConditionalGeneration"]), Task.SEQ2SEQ_LM),
        (BertConfig(architectures=["BertForSequenceClassification"]), Task.SEQ_CLS),
        (BertConfig(architectures=["BertForTokenClassification"]), Task.TOKEN_CLS),
        (BertConfig(architectures=["BertForMaskedLM"]), Task.BASE),
        (LlamaConfig(), Task.BASE),
    ],
)
def test_infer(config: PretrainedConfig, task: Task) -> None:
    assert infer_task(config) == task


def test_real_minilm_is_base() -> None:
    assert infer_task(AutoConfig.from_pretrained(MINILM)) == Task.BASE


def test_supported() -> None:
    assert Task.SEQ2SEQ_LM not in supported_tasks(LlamaConfig())
    assert Task.SEQ2SEQ_LM in supported_tasks(T5Config())


def test_wrong_task_names_alternatives() -> None:
    with pytest.raises(WrongModelType, match=r"Tasks that would work: seq-cls, token-cls"):
        resolve_task(Task.CAUSAL_LM, T5Config(architectures=["T5ForConditionalGeneration"]))
