"""Hidden-state dropout from the attention dropout's hash (`HashedDropout`, bigbird_ja/attention/dropout.py): the
keep mask against the hash's spec, nn.Dropout's contract (identity in eval mode and at p = 0, survivors scaled by
1 / (1 - p), the gradient through the same mask), reproducibility and replay under activation checkpointing, the
mask's statistics, the fallback to F.dropout, and the model's hidden dropouts taking it."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from bigbird_ja import BigBirdJaConfig, BigBirdJaModel
from bigbird_ja.attention import HashedDropout
from bigbird_ja.attention import dropout as D
from bigbird_ja.attention.dropout import AttentionDropout, keep_bits


@pytest.fixture(scope="module")
def native():
    if D.NATIVE is None:
        pytest.skip("the native hashed dropout is not built here")
    return D.NATIVE


def test_the_mask_is_the_hash_of_row_and_feature_with_a_seed_drawn_from_torch(native):
    x = torch.randn(2, 3, 37, 29, dtype=torch.float64)
    module = HashedDropout(0.3).train()
    torch.manual_seed(123)
    out = module(x)
    torch.manual_seed(123)
    seed = int(AttentionDropout.draw(0.3, True).seed)
    planes = torch.arange(6).view(6, 1, 1)
    keep = keep_bits(seed, AttentionDropout(0.3, seed).threshold, planes, torch.arange(37).view(1, 37, 1),
                     torch.arange(29).view(1, 1, 29)).view(x.shape)
    torch.testing.assert_close(out, x * keep * AttentionDropout(0.3, seed).scale, rtol=0, atol=0)


def test_eval_mode_and_p_zero_are_the_identity_and_bad_p_is_refused():
    x = torch.randn(4, 8)
    assert HashedDropout(0.1).eval()(x) is x
    assert HashedDropout(0.0).train()(x) is x
    assert torch.equal(HashedDropout(1.0).train()(x), torch.zeros_like(x))
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="hidden_dropout_prob"):
            HashedDropout(p)


def test_the_gradient_goes_through_the_same_mask(native):
    x = torch.randn(3, 50, 40, requires_grad=True)
    weight = torch.randn(3, 50, 40)
    torch.manual_seed(7)
    out = HashedDropout(0.25).train()(x)
    (out * weight).sum().backward()
    kept = out.detach() != 0
    torch.testing.assert_close(x.grad, weight * kept / 0.75)
    assert 0.2 < 1 - kept.float().mean().item() < 0.3


def test_calls_differ_and_a_seed_reproduces_them(native):
    x = torch.ones(1, 64, 64)
    module = HashedDropout(0.5).train()
    torch.manual_seed(0)
    first, second = module(x), module(x)
    assert not torch.equal(first, second)  # a fresh seed per call: layers and steps get different masks
    torch.manual_seed(0)
    assert torch.equal(module(x), first) and torch.equal(module(x), second)


def test_activation_checkpointing_replays_the_mask(native):
    """torch.utils.checkpoint restores the CPU generator before recomputing: the seed, so the mask, is the same,
    and the gradient equals the one without checkpointing."""
    module = HashedDropout(0.4).train()
    linear = torch.nn.Linear(32, 32)
    x = torch.randn(2, 40, 32, requires_grad=True)

    def block(t):
        return module(linear(t)).tanh()

    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(5)
        x.grad = None
        out = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        out.square().sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_kept_fraction_is_one_minus_p_and_rows_and_features_are_uncorrelated(native, p):
    torch.manual_seed(1)
    keep = HashedDropout(p).train()(torch.ones(4, 512, 768)) != 0  # 1.6M draws
    assert abs(keep.float().mean().item() - (1 - p)) < 0.003
    k = keep.float() - (1 - p)
    var = p * (1 - p)
    for a, b in ((k[:, 1:], k[:, :-1]), (k[..., 1:], k[..., :-1]), (k[1:], k[:-1])):  # rows, features, planes
        assert abs((a * b).mean().item() / var) < 0.01


def test_without_the_native_op_it_is_torch_dropout(monkeypatch):
    monkeypatch.setenv("BIGBIRD_JA_CPU_KERNELS", "0")
    x = torch.randn(2, 30, 20)
    torch.manual_seed(3)
    out = HashedDropout(0.2).train()(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, torch.nn.functional.dropout(x, 0.2, True), rtol=0, atol=0)
    half = HashedDropout(0.2).train()(x.half())  # fp16: no native kernel
    assert half.dtype == torch.float16


def test_the_model_hidden_dropouts_take_the_hash(native):
    config = BigBirdJaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=256, block_size=16,
                             attention_backend="blocked")
    model = BigBirdJaModel(config).train()
    hashed = [m for m in model.modules() if isinstance(m, HashedDropout)]
    assert len(hashed) == 1 + 3 * config.num_hidden_layers  # embeddings; per layer: attention out, FFN out, positions
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    ids = torch.randint(5, 100, (2, 70))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        model(input_ids=ids).last_hidden_state.sum().backward()
    names = [event.name for event in profile.events()]
    assert "aten::bernoulli_" not in names
    shapes = [event.input_shapes[0] for event in profile.events() if event.name == "bigbird_ja::hashed_dropout"]
    assert [2, 1, 1, 70, 32] in shapes
