"""Task -> transformers Auto class, and which tasks a checkpoint's config can serve."""

from __future__ import annotations

from typing import Any

import transformers
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto

from service.common.errors import WrongModelType
from service.common.load.spec import Task

AUTO_CLASS_NAMES: dict[Task, str] = {
    Task.CAUSAL_LM: "AutoModelForCausalLM",
    Task.SEQ_CLS: "AutoModelForSequenceClassification",
    Task.TOKEN_CLS: "AutoModelForTokenClassification",
    Task.SEQ2SEQ_LM: "AutoModelForSeq2SeqLM",
    Task.BASE: "AutoModel",
}

# Architecture names per task, most specific first: used to infer a task from
# `config.architectures` when the request leaves `task` null.
_ARCH_NAMES: tuple[tuple[Task, dict[str, Any]], ...] = (
    (Task.SEQ2SEQ_LM, modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    (Task.CAUSAL_LM, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    (Task.SEQ_CLS, modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    (Task.TOKEN_CLS, modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
    (Task.BASE, modeling_auto.MODEL_MAPPING_NAMES),
)


def auto_class(task: Task) -> Any:
    return getattr(transformers, AUTO_CLASS_NAMES[task])


def supported_tasks(config: PretrainedConfig) -> list[Task]:
    """Tasks whose Auto class has a model for this config type."""
    return [task for task in Task if type(config) in auto_class(task)._model_mapping]


def _names(value: Any) -> set[str]:
    return {value} if isinstance(value, str) else set(value)


def infer_task(config: PretrainedConfig) -> Task:
    supported = supported_tasks(config)
    for arch in getattr(config, "architectures", None) or []:
        for task, mapping in _ARCH_NAMES:
            if task in supported and any(arch in _names(v) for v in mapping.values()):
                return task
    if Task.BASE in supported:
        return Task.BASE
    if supported:
        return supported[0]
    raise WrongModelType(
        f"No transformers Auto class can load model_type {config.model_type!r}. "
        "Check that the checkpoint is a transformers model and that transformers is recent enough."
    )


def resolve_task(requested: Task | None, config: PretrainedConfig) -> Task:
    if requested is None:
        return infer_task(config)
    supported = supported_tasks(config)
    if requested not in supported:
        arch = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
        choices = ", ".join(t.value for t in supported) or "none"
        raise WrongModelType(
            f"The checkpoint ({arch}, model_type {config.model_type!r}) cannot be loaded as "
            f"{requested.value}. Tasks that would work: {choices}."
        )
    return requested
