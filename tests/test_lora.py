"""LoRA with PEFT (bigbird_ja.lora): `lora_config(task_type)` alone adapts every layer's attention and trains the
head in full; merged weights give the adapted model's outputs."""

from __future__ import annotations

import pytest
import torch

import bigbird_ja
from bigbird_ja.lora import TARGET_MODULES, lora_config
from conftest import random_batch, randomize_, tiny_config

peft = pytest.importorskip("peft", reason="pip install peft")


def test_peft_cannot_find_the_targets_of_a_bigbird_ja_model_by_itself():
    """Why the helper exists: PEFT knows target modules by model_type, and bigbird-ja is not among them."""
    model = bigbird_ja.BigBirdJaForSequenceClassification(tiny_config(num_labels=3))
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(model, peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS))


@pytest.mark.parametrize("task, model_class, trained_head", [
    ("SEQ_CLS", bigbird_ja.BigBirdJaForSequenceClassification, {"pooler", "classifier"}),
    ("TOKEN_CLS", bigbird_ja.BigBirdJaForTokenClassification, {"classifier"}),
    ("QUESTION_ANS", bigbird_ja.BigBirdJaForQuestionAnswering, {"qa_outputs"}),
])
def test_lora_config_alone_adapts_every_layer_and_trains_the_head(task, model_class, trained_head):
    config = tiny_config(num_labels=3)
    model = randomize_(model_class(config), seed=0).eval()
    ids, mask = random_batch(2, 37, config.vocab_size, seed=1)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask)[0]
    adapted = peft.get_peft_model(model, lora_config(task, r=4, lora_alpha=8, init_lora_weights=False))
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    for layer in range(config.num_hidden_layers):
        for target in TARGET_MODULES:
            assert any(f"layer.{layer}.{'attention.self.' if '.' not in target else ''}{target}.lora_A" in n
                       for n in trainable), (layer, target)
    assert all("lora_" in n or any(f"{h}." in n for h in trained_head) for n in trainable)
    assert all(any(f"{h}." in n for n in trainable) for h in trained_head)
    out = adapted(input_ids=ids, attention_mask=mask)[0]
    out.float().pow(2).mean().backward()  # gradients reach the adapters
    assert all(p.grad is not None for n, p in adapted.named_parameters() if "lora_A" in n)
    assert (out - before).abs().max() > 1e-4  # the adapters (initialised non-zero here) change the outputs
    with torch.no_grad():
        merged = adapted.merge_and_unload()(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(merged, out.detach(), rtol=1e-4, atol=1e-5)
