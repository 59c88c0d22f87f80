"""Attention dropout from a counter-based hash (bigbird_ja/attention/dropout.py, csrc/dropout.c): the hash against
its spec written out in plain Python; the native op against the PyTorch hash bit for bit; the op's gradient,
registration and fallback; the statistics of the mask (rate, and no correlation between neighbours)."""

import ctypes.util
import math
import os

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from bigbird_ja.attention import dropout as D
from bigbird_ja.attention.dropout import AttentionDropout, hashed_dropout, keep_mask

M32 = 0xFFFFFFFF


def spec_keep(seed, p, plane, i, j):
    """The module docstring's hash, one element, in Python ints."""
    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & M32
        x ^= x >> 15
        x = (x * 0x846CA68B) & M32
        return x ^ (x >> 16)

    lanes = []
    for key in (0x243F6A88, 0x85A308D3):
        s = mix(mix((seed & M32) ^ key) ^ (seed >> 32))
        lanes.append(mix(mix(s ^ plane) ^ i))
    h = mix(lanes[0] ^ ((j * (lanes[1] | 1)) & M32))
    return h >= min(int(p * 2 ** 32 + 0.5), M32)


@pytest.fixture(scope="module")
def native():
    if D.NATIVE is None:
        if os.environ.get("BIGBIRD_JA_NO_NATIVE", "0") in ("", "0"):  # the install was asked to build it
            pytest.fail(f"the install did not build the native hashed dropout: {D._NATIVE_WHY_NOT}")
        pytest.skip("installed with BIGBIRD_JA_NO_NATIVE=1")
    return D.NATIVE


def bits(t):
    """The tensor's bit patterns (so -0.0 counts)."""
    return t.contiguous().view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16))


def sparse_case(B=2, H=3, nr=5, bs=4, K=3, dtype=torch.float32, heads=True, seed=0):
    """probs [B, H, nr, bs, K*bs] with rows = the tokens of query blocks 1..nr and K random key blocks per head and
    row (heads=False: one set for every head), 7 blocks in all."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(B, H, nr, bs, K * bs, generator=gen, dtype=torch.float64).to(dtype)
    query_pos = (torch.arange(1, nr + 1)[:, None] * bs + torch.arange(bs))  # [nr, bs]
    blocks = torch.randint(0, 7, (H if heads else 1, nr, K), generator=gen)
    key_pos = (blocks[..., None] * bs + torch.arange(bs)).reshape(blocks.shape[0], nr, K * bs)
    return probs, query_pos, key_pos


def test_the_hash_is_the_one_its_docstring_specifies():
    gen = torch.Generator().manual_seed(0)
    drop = AttentionDropout(0.3, 2 ** 61 + 12345)  # both seed words nonzero
    mask = keep_mask(drop, 2, 3, 40)
    for _ in range(60):
        b, h, i, j = (int(torch.randint(0, n, (), generator=gen)) for n in (2, 3, 40, 40))
        assert bool(mask[b, h, i, j]) == spec_keep(drop.seed, drop.p, b * 3 + h, i, j)


def test_sparse_rows_see_the_same_bit_as_the_dense_mask_at_their_positions():
    """A (query, key) pair gets one bit wherever it appears (dense rows, sparse tiles, any head's block list)."""
    probs, query_pos, key_pos = sparse_case(dtype=torch.float64)
    B, H = probs.shape[:2]
    drop = AttentionDropout(0.25, 99)
    out = hashed_dropout(torch.ones_like(probs), query_pos, key_pos, drop)
    dense = keep_mask(drop, B, H, 28)  # [B, H, n, n]
    expected = dense[:, torch.arange(H)[:, None, None, None], query_pos[None, :, :, None], key_pos[:, :, None, :]]
    torch.testing.assert_close(out, expected.double() / (1 - drop.p), rtol=0, atol=0)


@pytest.mark.parametrize("chunk", ["two heads", "two row groups"])  # 5 heads, 5 row groups: a part left over
def test_the_pytorch_hash_in_chunks_is_the_hash_whole(monkeypatch, chunk):
    probs, query_pos, key_pos = sparse_case(B=3, H=5, dtype=torch.float64)
    drop = AttentionDropout(0.5, 7)
    whole = D.dropout_reference(probs, query_pos, key_pos, drop.p, drop.seed)
    monkeypatch.setitem(D.CHUNK_ELEMENTS, "cpu",
                        2 * (probs[0, 0] if chunk == "two heads" else probs[0, 0, 0]).numel())
    torch.testing.assert_close(D.dropout_reference(probs, query_pos, key_pos, drop.p, drop.seed), whole, rtol=0,
                               atol=0)


def _rand(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(len(shape) + sum(shape)), dtype=torch.float64)


NATIVE_CASES = {  # name: (probs, query_pos, key_pos) builder
    "sparse, per-head keys": lambda dt: sparse_case(dtype=dt),
    "sparse, one set of keys": lambda dt: sparse_case(B=1, H=4, nr=3, bs=8, K=5, dtype=dt, heads=False),
    "dense rows, odd length": lambda dt: (_rand(2, 3, 1, 13, 37).to(dt),
                                          torch.arange(13).view(1, 13), torch.arange(37).view(1, 1, 37)),
    # positions beyond 32 bits are taken mod 2**32 by both (and around 2**31, where a signed product would overflow)
    "large positions": lambda dt: (_rand(1, 2, 2, 3, 4).to(dt),
                                   torch.tensor([[2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1], [2 ** 32, 2 ** 40 + 3, 7]]),
                                   torch.tensor([[[2 ** 31, 2 ** 32 - 1, 2 ** 33 + 1, 0]] * 2])),
    # [4, 5, 9, 2, 2] with strides in every order, the last one 2
    "non-contiguous": lambda dt: (_rand(2, 5, 3, 4, 9).to(dt).transpose(0, 3)
                                  .transpose(2, 4)[..., ::2],
                                  torch.arange(9 * 2).view(9, 2) * 3,
                                  torch.randint(0, 100, (5, 9, 2), generator=torch.Generator().manual_seed(1))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_native_op_gives_the_pytorch_hash_bit_for_bit(native, case, dtype):
    probs, query_pos, key_pos = NATIVE_CASES[case](dtype)
    probs[..., 0] = -probs[..., 0]  # dropped negatives are -0.0 in both
    probs[..., 1] = float("nan")  # kept or dropped, NaN stays NaN (as F.dropout; its payload is not specified)
    drop = AttentionDropout(0.37, 2 ** 40 + 5)
    got = native(probs, query_pos, key_pos, drop.p, drop.seed)
    expected = D.dropout_reference(probs, query_pos, key_pos, drop.p, drop.seed)
    assert got.is_contiguous() and expected.is_contiguous()
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan) and bool(nan[..., 1].all())
    assert torch.equal(bits(got[~nan]), bits(expected[~nan]))
    assert (got == 0).any() and (got != 0).any()


def test_native_op_gives_the_same_bits_on_any_number_of_threads(native):
    probs = _rand(2, 12, 8, 64, 128).float()  # enough elements for several threads
    query_pos = torch.arange(8 * 64).view(8, 64)
    key_pos = torch.randint(0, 512, (12, 8, 128), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3, 8):
            torch.set_num_threads(n)
            results.append(native(probs, query_pos, key_pos, 0.1, 3))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(bits(results[0]), bits(r)) for r in results[1:])
    assert torch.equal(results[0], D.dropout_reference(probs, query_pos, key_pos, 0.1, 3))


@pytest.mark.parametrize("how", ["BIGBIRD_JA_CPU_KERNELS=0", "library absent"])
def test_without_the_native_op_the_pytorch_hash_gives_the_same_output(native, monkeypatch, how):
    probs, query_pos, key_pos = sparse_case(dtype=torch.float32)
    drop = AttentionDropout(0.1, 11)
    fast = hashed_dropout(probs, query_pos, key_pos, drop)
    if how == "library absent":
        monkeypatch.setattr(D, "NATIVE", None)
    else:
        monkeypatch.setenv("BIGBIRD_JA_CPU_KERNELS", "0")
    assert not D.native_supports(probs)
    assert torch.equal(bits(hashed_dropout(probs, query_pos, key_pos, drop)), bits(fast))


def test_a_library_built_before_the_dropout_kernel_is_named_and_not_used(monkeypatch):
    """An install from before csrc/dropout.c (the relative terms' library alone): the hash runs in PyTorch, and the
    reason says to reinstall."""
    monkeypatch.setattr(D, "library_path", lambda: ctypes.util.find_library("c"))  # a library without the functions
    native, why = D._load_native()
    assert native is None and "has no hashed dropout" in why and "reinstall" in why


def test_float16_takes_the_pytorch_hash():
    probs, query_pos, key_pos = sparse_case(dtype=torch.float16)
    drop = AttentionDropout(0.2, 5)
    out = hashed_dropout(probs, query_pos, key_pos, drop)
    keep = hashed_dropout(torch.ones_like(probs, dtype=torch.float32), query_pos, key_pos, drop) != 0
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, (probs.float() * keep / (1 - drop.p)).half(), rtol=0, atol=0)


def test_gradient_is_the_same_mask_applied_to_the_output_gradient():
    probs, query_pos, key_pos = sparse_case(B=1, H=2, nr=2, bs=3, K=2, dtype=torch.float64)
    drop = AttentionDropout(0.4, 8)
    assert torch.autograd.gradcheck(lambda x: hashed_dropout(x, query_pos, key_pos, drop),
                                    (probs.requires_grad_(),))
    assert torch.autograd.gradgradcheck(lambda x: hashed_dropout(x, query_pos, key_pos, drop), (probs,))


def test_backward_regenerates_the_mask_and_saves_only_the_positions():
    probs, query_pos, key_pos = sparse_case(dtype=torch.float32)
    probs.requires_grad_()
    drop = AttentionDropout(0.3, 21)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = hashed_dropout(probs, query_pos, key_pos, drop)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.int64, tuple(query_pos.shape)),
                                                          (torch.int64, tuple(key_pos.shape)), (torch.int64, ())]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad)
    keep = out != 0
    torch.testing.assert_close(probs.grad, grad * keep * drop.scale, rtol=0, atol=0)  # as the op rounds


def test_op_is_registered_and_compiles_without_graph_breaks():
    probs, query_pos, key_pos = sparse_case(dtype=torch.float32)
    drop = AttentionDropout(0.1, 1234)
    assert D.DROPOUT_OP is torch.ops.bigbird_ja.hashed_dropout.default

    def f(x):
        return hashed_dropout(x.exp(), query_pos, key_pos, drop).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    torch.testing.assert_close(compiled(x1), f(x2), rtol=0, atol=0)
    compiled(x1).square().sum().backward()
    f(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    # a new seed each call (each layer and step): the compiled graph must take it as an input, not a constant
    seeded = torch.compile(lambda x, d: hashed_dropout(x, query_pos, key_pos, d), fullgraph=True,
                           backend="aot_eager")
    for seed in (5, 6, 2 ** 50 + 7):
        d = AttentionDropout(0.5, seed)
        torch.testing.assert_close(seeded(probs, d), hashed_dropout(probs, query_pos, key_pos, d), rtol=0, atol=0)
    # the seed drawn inside the graph (a tensor there, no .item(): fullgraph holds without capture_scalar_outputs):
    # the eager draw's mask
    drawn = torch.compile(lambda x: hashed_dropout(x, query_pos, key_pos, AttentionDropout.draw(0.5, True)),
                          fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    inside = drawn(probs)
    torch.manual_seed(0)
    torch.testing.assert_close(inside, hashed_dropout(probs, query_pos, key_pos, AttentionDropout.draw(0.5, True)),
                               rtol=0, atol=0)
    torch.library.opcheck(torch.ops.bigbird_ja.hashed_dropout.default,
                          (probs, query_pos, key_pos, 0.1, torch.tensor(1234)))


def test_op_runs_on_meta_tensors_forward_and_backward():
    """Shapes only (the planner's memory count runs the model on the meta device)."""
    probs = torch.empty(1, 2, 3, 4, 8, device="meta", requires_grad=True)
    query_pos = torch.empty(3, 4, dtype=torch.int64, device="meta")
    key_pos = torch.empty(2, 3, 8, dtype=torch.int64, device="meta")
    out = hashed_dropout(probs, query_pos, key_pos, AttentionDropout(0.1, 3))
    out.sum().backward()
    assert out.shape == probs.grad.shape == probs.shape and probs.grad.device.type == "meta"


def test_bad_input_is_refused_with_the_fix():
    probs, query_pos, key_pos = sparse_case()
    drop = AttentionDropout(0.1, 1)
    with pytest.raises(ValueError, match=r"\[B, H, 1, rows, Np\]"):
        hashed_dropout(probs[0], query_pos, key_pos, drop)
    with pytest.raises(ValueError, match="query_pos"):
        hashed_dropout(probs, query_pos.int(), key_pos, drop)
    with pytest.raises(ValueError, match="Hk 1 or 3"):
        hashed_dropout(probs, query_pos, key_pos[:2], drop)
    with pytest.raises(ValueError, match="outside"):
        AttentionDropout(1.0, 1)
    with pytest.raises(ValueError, match="2\\*\\*62"):
        AttentionDropout(0.1, 2 ** 62)


def test_dropout_into_a_buffer_refuses_one_that_shares_memory_with_probs():
    probs, query_pos, key_pos = sparse_case()
    drop = AttentionDropout(0.1, 5)
    expected = hashed_dropout(probs, query_pos, key_pos, drop)
    out = torch.empty_like(probs)
    assert torch.equal(bits(D.hashed_dropout_into(out, probs, query_pos, key_pos, drop)), bits(expected))
    with pytest.raises(ValueError, match="shares memory with probs"):
        D.hashed_dropout_into(probs, probs, query_pos, key_pos, drop)
    # a buffer one row further along the same storage: the ranges meet without the pointers being equal
    storage = torch.cat([probs.flatten(), torch.rand(probs.shape[-1], dtype=probs.dtype)])
    shifted = storage[probs.shape[-1]:].view(probs.shape)
    with pytest.raises(ValueError, match="shares memory with probs"):
        D.hashed_dropout_into(shifted, storage[:probs.numel()].view(probs.shape), query_pos, key_pos, drop)
    # probs strided (a slice of a wider buffer) beside, not inside, out: accepted
    wide = torch.rand(*probs.shape[:-1], 2 * probs.shape[-1], dtype=probs.dtype)
    wide[..., :probs.shape[-1]] = probs
    assert torch.equal(bits(D.hashed_dropout_into(out, wide[..., :probs.shape[-1]], query_pos, key_pos, drop)),
                       bits(expected))
    # meta tensors (the planner counts a step on them) have no memory to share, whatever their data_ptr says
    meta = probs.to("meta")
    assert D.hashed_dropout_into(torch.empty_like(meta), meta, query_pos.to("meta"), key_pos.to("meta"),
                                 drop).shape == probs.shape


def test_draw_follows_torch_seed_and_is_none_without_dropout():
    assert AttentionDropout.draw(0.1, training=False) is None
    assert AttentionDropout.draw(0.0, training=True) is None
    torch.manual_seed(3)
    first = [AttentionDropout.draw(0.1, True) for _ in range(3)]
    torch.manual_seed(3)
    again = [AttentionDropout.draw(0.1, True) for _ in range(3)]
    assert first == again and len({d.seed for d in first}) == 3


def test_activation_checkpointing_replays_the_mask():
    probs, query_pos, key_pos = sparse_case(dtype=torch.float64)

    def layer(x):  # draws its seed inside, as the attention does
        return hashed_dropout(x.sin(), query_pos, key_pos, AttentionDropout.draw(0.5, True)).square().sum()

    grads = []
    for wrap in (lambda x: layer(x), lambda x: checkpoint(layer, x, use_reentrant=False)):
        torch.manual_seed(0)
        x = probs.clone().requires_grad_()
        wrap(x).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


# ---- statistics: n Bernoulli draws; a rate or a correlation coefficient of independent masks is within
# z / sqrt(n) standard deviations of its expectation (z = 6: a false alarm about once in 10**9 runs)
Z = 6.0


def correlation(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_is_one_minus_p(p):
    mask = keep_mask(AttentionDropout(p, 42), 2, 4, 256)
    n = mask.numel()
    assert abs(float(mask.double().mean()) - (1 - p)) < Z * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_of_neighbours_are_uncorrelated(p):
    """Neighbouring keys, queries, heads and batch rows of one mask, and the masks of neighbouring seeds (layers and
    steps draw their own) or seeds differing in the high word only."""
    drop = AttentionDropout(p, 2 ** 33 + 77)
    mask = keep_mask(drop, 2, 4, 256)  # [B, H, n, n]
    upper = torch.triu_indices(256, 256, 1)
    pairs = {
        "adjacent keys": (mask[..., :-1], mask[..., 1:]),
        "adjacent queries": (mask[:, :, :-1], mask[:, :, 1:]),
        "adjacent heads": (mask[:, :-1], mask[:, 1:]),
        "adjacent batch rows": (mask[:-1], mask[1:]),
        "transposed pairs (i, j) and (j, i), i < j": (mask[..., upper[0], upper[1]], mask[..., upper[1], upper[0]]),
    }
    for name, seed in (("seed + 1", drop.seed + 1), ("seed + 2**32", drop.seed + 2 ** 32)):
        pairs[name] = (mask, keep_mask(AttentionDropout(p, seed), 2, 4, 256))
    for name, (a, b) in pairs.items():
        r = correlation(a, b)
        print(f"{name}: r = {r:+.5f} over {a.numel()} pairs")
        assert abs(r) < Z / math.sqrt(a.numel()), name


def test_masks_of_rows_far_apart_are_uncorrelated():
    """Every pair of the first 64 query rows of one plane (a structured hash shows as some pairs far off)."""
    drop = AttentionDropout(0.5, 5)
    mask = D.keep_bits(drop.seed, drop.threshold, torch.tensor(0), torch.arange(64)[:, None],
                       torch.arange(4096)).double()  # [64, 4096]
    centred = mask - mask.mean(dim=1, keepdim=True)
    normed = centred / centred.norm(dim=1, keepdim=True)
    r = normed @ normed.T
    off = r[~torch.eye(64, dtype=torch.bool)]
    # 2016 pairs: z = 6.5 for the largest
    assert float(off.abs().max()) < 6.5 / math.sqrt(mask.shape[1]), float(off.abs().max())
