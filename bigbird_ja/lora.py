"""LoRA for bigbird-ja models with PEFT: `lora_config(task_type)` names the modules PEFT cannot find by itself.

PEFT picks a model's LoRA targets from its `model_type` (a table inside PEFT); `bigbird-ja` is not in it and PEFT
has no supported way to add one, so `LoraConfig(task_type=...)` alone stops with "Please specify
`target_modules`". The parameter names are DeBERTa-v2's, so the targets are DeBERTa-v2's: every layer's
`query_proj`, `key_proj`, `value_proj` and the attention output `attention.output.dense` (`TARGET_MODULES`); pass
`target_modules=` to change them (`intermediate.dense` and `output.dense` reach the feed-forward too). The task head
is trained in full: PEFT adds `classifier` / `qa_outputs` itself, and `pooler` (the sequence-classification and
multiple-choice heads' dense layer over [CLS], which fine-tuning trains) is added here.

    import bigbird_ja
    from bigbird_ja.lora import lora_config
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    model = get_peft_model(model, lora_config("SEQ_CLS", r=8, lora_alpha=16))
"""

from __future__ import annotations

TARGET_MODULES = ["query_proj", "key_proj", "value_proj", "attention.output.dense"]
# heads with a pooler over [CLS] that fine-tuning trains; PEFT adds the classifier itself
_POOLED_TASKS = ("SEQ_CLS",)


def lora_config(task_type, **kwargs):
    """A `peft.LoraConfig` for a bigbird-ja model: `TARGET_MODULES` and, for sequence classification, the pooler
    in `modules_to_save`, unless given. task_type: a `peft.TaskType` or its name ("SEQ_CLS", "TOKEN_CLS",
    "QUESTION_ANS", "FEATURE_EXTRACTION"); other keywords go to LoraConfig as they are."""
    try:
        from peft import LoraConfig, TaskType
    except ImportError as err:
        raise ImportError("bigbird_ja.lora needs PEFT: pip install peft") from err
    task = TaskType(task_type) if isinstance(task_type, str) else task_type
    kwargs.setdefault("target_modules", list(TARGET_MODULES))
    if task.value in _POOLED_TASKS:
        kwargs.setdefault("modules_to_save", ["pooler"])
    return LoraConfig(task_type=task, **kwargs)


__all__ = ["TARGET_MODULES", "lora_config"]
