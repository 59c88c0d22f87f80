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
