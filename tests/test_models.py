"""The model classes: heads, Auto registration, safetensors round trip, gradient checkpointing, dtypes, errors."""

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.utils import ModelOutput

import bigbird_ja
from conftest import random_batch, randomize_, tiny_config

AUTO_CLASSES = {
    AutoModel: bigbird_ja.BigBirdJaModel,
    AutoModelForMaskedLM: bigbird_ja.BigBirdJaForMaskedLM,
    AutoModelForQuestionAnswering: bigbird_ja.BigBirdJaForQuestionAnswering,
    AutoModelForSequenceClassification: bigbird_ja.BigBirdJaForSequenceClassification,
    AutoModelForMultipleChoice: bigbird_ja.BigBirdJaForMultipleChoice,
    AutoModelForTokenClassification: bigbird_ja.BigBirdJaForTokenClassification,
}


def inputs_for(model_class, config, seed=0, length=45):
    ids, mask = random_batch(3, length, config.vocab_size, seed)
    gen = torch.Generator().manual_seed(seed)
    if model_class is bigbird_ja.BigBirdJaForMultipleChoice:
        # two different choices: equal ones would score equally whatever the weights, leaving nothing to learn
        other_ids, other_mask = random_batch(3, length, config.vocab_size, seed + 1)
        return dict(input_ids=torch.stack([ids, other_ids], 1), attention_mask=torch.stack([mask, other_mask], 1),
                    labels=torch.tensor([0, 1, 1]))
    batch = dict(input_ids=ids, attention_mask=mask)
    if model_class is bigbird_ja.BigBirdJaForMaskedLM:
        batch["labels"] = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100)
    elif model_class is bigbird_ja.BigBirdJaForQuestionAnswering:
        batch.update(start_positions=torch.tensor([2, 5, 0]), end_positions=torch.tensor([4, 9, 0]))
    elif model_class is bigbird_ja.BigBirdJaForSequenceClassification:
        batch["labels"] = torch.tensor([0, 2, 1])
    elif model_class is bigbird_ja.BigBirdJaForTokenClassification:
        batch["labels"] = torch.where(mask.bool(), torch.randint(0, 3, ids.shape, generator=gen), -100)
    return batch


@pytest.mark.parametrize("auto_class", list(AUTO_CLASSES), ids=lambda c: c.__name__)
def test_auto_classes_build_save_and_reload_with_safetensors(tmp_path, auto_class):
    config = tiny_config(num_labels=3)
    model = auto_class.from_config(config)
    assert type(model) is AUTO_CLASSES[auto_class]
    randomize_(model, seed=1).eval()
    batch = inputs_for(type(model), config)
    with torch.no_grad():
        before = model(**batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert set(saved) == set(loaded)
    for key, value in saved.items():  # the round trip itself is exact
        assert torch.equal(loaded[key], value), key
    with torch.no_grad():
        after = reloaded(**batch)
    for key, value in before.items():
        # Equal weights in other buffers may take another SIMD path through the CPU GEMM (seen: 1 ulp, 6e-8 on a
        # logit), so outputs are compared to float32 rounding, not bit for bit.
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(after[key], value, rtol=1e-6, atol=1e-6)
    if "loss" in before:
        assert torch.isfinite(before.loss)


def test_masked_lm_decoder_is_tied_to_the_word_embeddings(tmp_path):
    model = bigbird_ja.BigBirdJaForMaskedLM(tiny_config())
    assert model.cls.predictions.decoder.weight is model.bigbird_ja.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    reloaded = bigbird_ja.BigBirdJaForMaskedLM.from_pretrained(tmp_path)
    assert reloaded.cls.predictions.decoder.weight is reloaded.bigbird_ja.embeddings.word_embeddings.weight


def test_sequence_classification_regression():
    config = tiny_config(num_labels=1)
    model = bigbird_ja.BigBirdJaForSequenceClassification(config)
    ids, mask = random_batch(3, 20, config.vocab_size, 0)
    labels = torch.tensor([0.5, 3.0, 4.2])
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), labels))


HEADS = [c for c in AUTO_CLASSES.values() if c is not bigbird_ja.BigBirdJaModel]
# Biases a softmax ignores: one shift shared by every position (start/end logits) or every choice. Their gradient
# is zero up to rounding, so they need not move.
SHIFT_INVARIANT = {bigbird_ja.BigBirdJaForQuestionAnswering: {"qa_outputs.bias"},
                   bigbird_ja.BigBirdJaForMultipleChoice: {"classifier.bias"}}


@pytest.mark.parametrize("model_class", HEADS, ids=lambda c: c.__name__)
def test_every_head_trains_one_step(model_class):
    config = tiny_config(num_labels=3)  # no dropout: both losses are of the same function
    torch.manual_seed(0)  # the initial weights
    model = model_class(config).train()
    batch = inputs_for(model_class, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = model(**batch).loss
    loss.backward()
    # Adam's first step moves every parameter with a non-zero gradient by about lr, however small the gradient
    # (at initialisation some are below float32's resolution for SGD); without weight decay, nothing else moves.
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    unchanged = [name for name, p in model.named_parameters()
                 if torch.equal(p, before[name]) and name not in SHIFT_INVARIANT.get(model_class, ())]
    assert not unchanged, f"parameters the step did not move: {unchanged}"
    with torch.no_grad():
        after = model(**batch).loss
    print(f"{model_class.__name__}: loss {loss.item():.5f} -> {after.item():.5f}")
    assert after < loss.detach()


OUTPUT_FIELDS = {bigbird_ja.BigBirdJaModel: ("last_hidden_state",),
                 bigbird_ja.BigBirdJaForQuestionAnswering: ("start_logits", "end_logits")}


@pytest.mark.parametrize("model_class", list(AUTO_CLASSES.values()), ids=lambda c: c.__name__)
@pytest.mark.parametrize("with_labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize("hidden_states", [False, True], ids=["last", "hidden_states"])
def test_return_dict_false_gives_loss_outputs_and_hidden_states_in_order(model_class, with_labels, hidden_states):
    config = tiny_config(num_labels=3)
    model = randomize_(model_class(config), seed=2).eval()
    batch = inputs_for(model_class, config)
    if not with_labels:
        batch = {key: batch[key] for key in ("input_ids", "attention_mask")}
    has_loss = with_labels and model_class is not bigbird_ja.BigBirdJaModel
    expected = (("loss",) if has_loss else ()) + OUTPUT_FIELDS.get(model_class, ("logits",)) \
        + (("hidden_states",) if hidden_states else ())
    with torch.no_grad():
        as_dict = model(**batch, output_hidden_states=hidden_states)
        as_tuples = [model(**batch, output_hidden_states=hidden_states, return_dict=False)]
        model.config.return_dict = False  # the config's setting is the default...
        as_tuples.append(model(**batch, output_hidden_states=hidden_states))
        # ...which an explicit return_dict=True overrides
        assert isinstance(model(**batch, output_hidden_states=hidden_states, return_dict=True), ModelOutput)
    for as_tuple in as_tuples:
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(expected), (expected, len(as_tuple))
        for name, value in zip(expected, as_tuple):
            if name == "hidden_states":
                assert len(value) == config.num_hidden_layers + 1
                for layer, state in enumerate(value):
                    torch.testing.assert_close(state, as_dict.hidden_states[layer], rtol=0, atol=0)
            else:
                torch.testing.assert_close(value, as_dict[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_config_edited_before_the_model_is_built_is_checked_by_the_model():
    config = tiny_config()
    config.num_window_blocks = 2  # transformers does not validate a subclass's fields on assignment
    with pytest.raises(ValueError, match="num_window_blocks=2.*odd"):
        bigbird_ja.BigBirdJaModel(config)
    with pytest.raises(ValueError, match="num_window_blocks"):
        bigbird_ja.BigBirdJaForMaskedLM(config)


def test_blocked_and_reference_models_agree_in_float64_with_gradients():
    torch.manual_seed(0)
    models = {}
    for backend in ("reference", "blocked"):
        model = bigbird_ja.BigBirdJaForMaskedLM(tiny_config(attention_backend=backend)).double()
        randomize_(model, seed=11)
        models[backend] = model.eval()
    ids, mask = random_batch(3, 93, 101, seed=12)
    results = {}
    for backend, model in models.items():
        embeds = model.bigbird_ja.embeddings.word_embeddings(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100))
        out.loss.backward()
        results[backend] = (out.logits, embeds.grad, {n: p.grad for n, p in model.named_parameters()})
    ref, blk = results["reference"], results["blocked"]
    valid = mask.bool()
    print("max logits difference", (ref[0] - blk[0])[valid].abs().max().item())
    torch.testing.assert_close(blk[0][valid], ref[0][valid], rtol=0, atol=1e-10)
    torch.testing.assert_close(blk[1], ref[1], rtol=0, atol=1e-10)
    for name, grad in ref[2].items():
        torch.testing.assert_close(blk[2][name], grad, rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    ids, mask = random_batch(2, 70, config.vocab_size, seed=3)
    grads = []
    for checkpointing in (False, True):
        model = bigbird_ja.BigBirdJaForMaskedLM(config)
        randomize_(model, seed=4).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        torch.manual_seed(5)  # the same dropout masks in both runs
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=lambda m: f"{name}: {m}")


def test_bfloat16_runs_on_cpu_without_nan():
    model = bigbird_ja.BigBirdJaForQuestionAnswering(tiny_config()).to(torch.bfloat16)
    ids, mask = random_batch(3, 70, 101, seed=6)  # the last row holds a single token
    out = model(ids, attention_mask=mask, start_positions=torch.tensor([1, 2, 0]),
                end_positions=torch.tensor([3, 4, 0]))
    assert out.start_logits.dtype == torch.bfloat16
    assert torch.isfinite(out.start_logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sequence_over_the_limit_is_an_error_naming_the_fix():
    model = bigbird_ja.BigBirdJaModel(tiny_config(max_position_embeddings=128))
    with pytest.raises(ValueError, match="max_position_embeddings=128.*(truncate|window)"):
        model(torch.ones(1, 129, dtype=torch.long))


def test_bad_attention_mask_shape_is_an_error():
    model = bigbird_ja.BigBirdJaModel(tiny_config())
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(2, 10, dtype=torch.long), attention_mask=torch.ones(2, 10, 10))


def test_output_attentions_is_refused_with_the_alternative():
    model = bigbird_ja.BigBirdJaModel(tiny_config())
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(1, 10, dtype=torch.long), output_attentions=True)


def test_hidden_states_are_returned_per_layer():
    config = tiny_config()
    out = bigbird_ja.BigBirdJaModel(config)(torch.ones(1, 10, dtype=torch.long), output_hidden_states=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


# ----------------------------------------------------------------------------------------------------------------
# The drop-in surface: the Auto classes DeBERTa-v2 maps, strict forward keywords, what transformers itself passes


def test_pretraining_and_text_encoding_auto_classes_resolve_as_for_deberta_v2(tmp_path):
    """DeBERTa-v2 maps AutoModelForPreTraining to its MaskedLM model and AutoModelForTextEncoding to its encoder."""
    from transformers import AutoModelForPreTraining, AutoModelForTextEncoding

    config = tiny_config()
    assert type(AutoModelForPreTraining.from_config(config)) is bigbird_ja.BigBirdJaForMaskedLM
    assert type(AutoModelForTextEncoding.from_config(config)) is bigbird_ja.BigBirdJaModel
    randomize_(bigbird_ja.BigBirdJaForMaskedLM(config), seed=3).save_pretrained(tmp_path)
    assert type(AutoModelForPreTraining.from_pretrained(tmp_path)) is bigbird_ja.BigBirdJaForMaskedLM
    encoder = AutoModelForTextEncoding.from_pretrained(tmp_path)  # the encoder of a MaskedLM checkpoint
    assert type(encoder) is bigbird_ja.BigBirdJaModel
    mlm = bigbird_ja.BigBirdJaForMaskedLM.from_pretrained(tmp_path)
    torch.testing.assert_close(encoder.embeddings.word_embeddings.weight,
                               mlm.bigbird_ja.embeddings.word_embeddings.weight, rtol=0, atol=0)


ALL_MODELS = list(AUTO_CLASSES.values())


@pytest.mark.parametrize("model_class", ALL_MODELS, ids=lambda c: c.__name__)
def test_unknown_forward_keywords_are_a_type_error_naming_every_one(model_class):
    """A misspelt `attention_maks=` must not be dropped (the model would run unmasked), nor a `head_mask=` that the
    block-sparse attention does not take."""
    config = tiny_config(num_labels=3)
    model = model_class(config).eval()
    batch = inputs_for(model_class, config)
    with pytest.raises(TypeError) as error:
        model(**batch, attention_maks=batch["attention_mask"], head_mask=torch.ones(4))
    message = str(error.value)
    print(message)
    assert model_class.__name__ in message and "'attention_maks'" in message and "'head_mask'" in message
    assert "attention_mask" in message.replace("'attention_maks'", "")  # the likely meant name is suggested
    with pytest.raises(TypeError, match="'num_items_in_batch'"):
        model(**batch, num_items_in_batch=3)


@pytest.mark.parametrize("model_class", ALL_MODELS, ids=lambda c: c.__name__)
def test_the_keywords_transformers_passes_to_models_are_accepted(model_class):
    config = tiny_config(num_labels=3)
    model = randomize_(model_class(config), seed=4).eval()
    batch = inputs_for(model_class, config)
    with torch.no_grad():
        plain = model(**batch)
        generic = model(**batch, return_dict=True, output_attentions=False, output_hidden_states=None,
                        token_type_ids=torch.zeros_like(batch["input_ids"]), position_ids=None)
    for key, value in plain.items():
        torch.testing.assert_close(generic[key], value, rtol=0, atol=0)
    # transformers' Trainer passes `num_items_in_batch` to a forward that takes **kwargs and then trusts the model
    # to have divided the loss by it (it no longer divides by gradient_accumulation_steps itself). These models
    # average their loss over the batch, so their forward must not look like it takes arbitrary keywords.
    import inspect

    parameters = inspect.signature(model.forward).parameters.values()
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _word_tokenizer(vocab_size: int):
    """A fast word-level tokenizer with DeBERTa's special tokens ([PAD]=0), for transformers' own pipelines."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def test_transformers_feature_extraction_and_fill_mask_pipelines_run_the_models():
    from transformers import pipeline

    config = tiny_config()
    tokenizer = _word_tokenizer(config.vocab_size)
    encoder = randomize_(bigbird_ja.BigBirdJaModel(config), seed=5).eval()
    text = " ".join(f"w{i}" for i in range(1, 40))
    features = pipeline("feature-extraction", model=encoder, tokenizer=tokenizer, device="cpu")(text)
    assert torch.tensor(features).shape == (1, 41, config.hidden_size)
    with torch.no_grad():
        expected = encoder(**tokenizer(text, return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(torch.tensor(features), expected)
    mlm = randomize_(bigbird_ja.BigBirdJaForMaskedLM(config), seed=6).eval()
    filled = pipeline("fill-mask", model=mlm, tokenizer=tokenizer, device="cpu")(text.replace("w7 ", "[MASK] "),
                                                                                   top_k=3)
    assert len(filled) == 3 and all("[MASK]" not in f["sequence"] for f in filled)
    assert [f["score"] for f in filled] == sorted((f["score"] for f in filled), reverse=True)


LORA_TARGETS = ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                "attention.output.dense", "intermediate.dense", "output.dense")


def test_the_lora_target_modules_the_readme_names_are_linear_layers_of_every_layer():
    """README, "LoRA": the names to give `peft.LoraConfig(target_modules=...)` (DeBERTa-v2's names)."""
    config = tiny_config()
    model = bigbird_ja.BigBirdJaForSequenceClassification(config)
    modules = dict(model.named_modules())
    for layer in range(config.num_hidden_layers):
        for target in LORA_TARGETS:
            name = f"bigbird_ja.encoder.layer.{layer}.{target}"
            assert isinstance(modules.get(name), torch.nn.Linear), name
    linear_suffixes = {name.split(".")[-1] for name, m in modules.items() if isinstance(m, torch.nn.Linear)}
    # what fine-tuning adds on top and LoRA should train in full (modules_to_save)
    assert {"dense", "classifier"} <= linear_suffixes and "pooler" in dict(model.named_children())
