"""The training pool (workspace.ReusePool): large buffers of eager CPU training handed out again only once nothing
else holds them, and training through it computing what it computes without it (float64, against the reference,
step after step, with every buffer pooled)."""

import pytest
import torch

from bigbird_ja.attention import (RelativePositionSpec, disentangled_attention, layout_for, reference_attention,
                                  workspace)
from bigbird_ja.attention.dropout import AttentionDropout, keep_mask
from conftest import tiny_config
from test_attention_backends import make_inputs


@pytest.fixture
def pool(monkeypatch):
    fresh = workspace.ReusePool()
    monkeypatch.setattr(fresh, "min_bytes", 0)
    return fresh


def storage(t):
    return t.untyped_storage().data_ptr()


def test_a_buffer_is_handed_out_again_only_when_nothing_holds_it(pool):
    like = torch.empty(0)
    first = pool.empty((4, 100), like)
    second = pool.empty((4, 100), like)
    assert storage(first) != storage(second)  # the first is still held
    address = storage(first)
    del first
    third = pool.empty((4, 100), like)
    assert storage(third) == address and third.shape == (4, 100)
    view = third[1:]  # a view (or a tensor saved for a backward) holds the storage too
    del third
    assert storage(pool.empty((4, 100), like)) not in (address, storage(second))
    del view
    assert storage(pool.empty((4, 100), like)) == address


def test_sizes_close_enough_share_a_buffer_and_other_dtypes_do_not(pool):
    like = torch.empty(0)
    address = storage(pool.empty((1000,), like))  # dropped at once: free
    assert storage(pool.empty((900,), like)) == address  # within 1.25x
    assert storage(pool.empty((500,), like)) != address  # too small for it: a new one
    assert storage(pool.empty((1000,), torch.empty(0, dtype=torch.float64))) != address
    assert storage(pool.empty((1001,), like)) != address  # larger than it


def test_the_pool_keeps_at_most_max_bytes_dropping_free_buffers_least_recent_first(pool, monkeypatch):
    monkeypatch.setattr(pool, "max_bytes", 3 * 400)
    like = torch.empty(0)
    held = [pool.empty((100,), like) for _ in range(2)]  # 800 bytes held
    oldest_free = storage(pool.empty((100,), like))  # kept, free: 1,200 bytes
    pool.empty((150,), like)  # 600 more: the free one goes first
    assert oldest_free not in {storage(b) for b in pool._buffers()}
    assert sum(b.numel() * 4 for b in pool._buffers()) == pool.kept_bytes() <= pool.max_bytes
    too_big = pool.empty((1000,), like)  # cannot be kept: a fresh tensor
    assert storage(too_big) not in {storage(b) for b in pool._buffers()}
    del held


def test_small_buffers_and_other_devices_are_not_pooled():
    like = torch.empty(0)
    small = workspace.POOL.empty((8,), like)
    assert storage(small) not in {storage(b) for b in workspace.POOL._buffers()}


def test_only_eager_cpu_training_gets_the_pool(monkeypatch):
    x = torch.empty(1)
    assert workspace.pool_for(x, traced=False) is workspace.POOL
    assert workspace.pool_for(x, traced=True) is None
    with torch.no_grad():
        assert workspace.pool_for(x, traced=False) is None
    monkeypatch.setenv("BIGBIRD_JA_CPU_WORKSPACE", "0")
    assert workspace.pool_for(x, traced=False) is None


@pytest.mark.parametrize("dropout", [False, True])
def test_training_through_the_pool_matches_the_reference_step_after_step(monkeypatch, pool, dropout):
    """Every buffer of the blocked backend's training pooled (min_bytes 0), three steps on fresh inputs of one shape
    (the later ones reuse the first one's buffers): outputs and gradients equal the dense reference's in float64."""
    from bigbird_ja.attention import blocked, cpu_kernels

    if cpu_kernels.relative_terms() is None:
        pytest.skip("no native library: the pool serves the native path")
    monkeypatch.setattr(workspace, "POOL", pool)
    monkeypatch.setattr(blocked, "pool_for", lambda x, traced: None if traced else pool)
    config = tiny_config(max_position_embeddings=256, position_buckets=32)
    spec = RelativePositionSpec.from_config(config)
    addresses = []
    for step in range(3):
        q, k, v, pos_key, pos_query, padding = inputs = make_inputs(config, 3, 131, seed=step)
        layout = layout_for(config, 1, 131)
        kwargs = dict(dropout_p=0.3, training=True) if dropout else {}
        torch.manual_seed(step)
        out = disentangled_attention(q, k, v, layout, padding, 0.37, pos_key, pos_query, spec, backend="blocked",
                                     **kwargs)
        if dropout:  # the mask the call drew
            torch.manual_seed(step)
            kwargs["dropout_mask"] = keep_mask(AttentionDropout.draw(0.3, True), 3, q.shape[1], 131)
        ref = reference_attention(q, k, v, layout.token_mask(131), padding, 0.37, pos_key, pos_query, spec, **kwargs)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(step), dtype=out.dtype)
        tensors = [t for t in inputs if t.requires_grad]
        got = torch.autograd.grad((out * weights).sum(), tensors)
        expected = torch.autograd.grad((ref * weights).sum(), tensors)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
        addresses.append({storage(b) for b in pool._buffers()})
    assert addresses[0] and addresses[1] == addresses[0] == addresses[2]  # the later steps made nothing new



@pytest.mark.parametrize("buffer", ["pool", "workspace"])
def test_the_p2c_product_writes_the_zero_halo_rows_without_multiplying_them(pool, buffer):
    """k's halo rows are zeros: their rows of k . pos_query are written as zeros into a buffer that held something
    else, and the matmuls (forward, and backward in training) run over the n interior rows only, not all T."""
    from bigbird_ja.attention.blocked_terms import _product

    gen = torch.Generator().manual_seed(3)
    B, H, n, D, m, halo = 2, 3, 40, 8, 24, 6
    T = n + 2 * halo
    training = buffer == "pool"
    k = torch.randn(B, H, n, D, generator=gen, dtype=torch.float64, requires_grad=training)
    k_halo = torch.nn.functional.pad(k, (0, 0, halo, halo))  # as blocked._pad makes it: the halo is constant
    y = torch.randn(H, D, m, generator=gen, dtype=torch.float64, requires_grad=training)
    weight = torch.randn(B, H, T, m, generator=gen, dtype=torch.float64)
    expected = k_halo @ y.unsqueeze(0)
    want = torch.autograd.grad((expected * weight).sum(), [k, y]) if training else None
    ws = None if training else workspace.Workspace()
    if training:  # a used buffer of the same size, now free: the pool hands it out again
        pool.empty((B, H, T, m), weight).fill_(float("nan"))
    else:
        ws.empty("kp", (B * H, T, m), weight).fill_(float("nan"))
    with torch.profiler.profile(record_shapes=True) as profile, torch.set_grad_enabled(training):
        out = _product(k_halo, y, ws, "kp", pool if training else None, halo=halo)
        got = torch.autograd.grad((out * weight).sum(), [k, y]) if training else None
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(out[:, :, :halo], torch.zeros_like(out[:, :, :halo]))
    assert torch.equal(out[:, :, -halo:], torch.zeros_like(out[:, :, -halo:]))
    for a, b in zip(got or (), want or ()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    products = [event.input_shapes for event in profile.events()
                if event.name in ("aten::bmm", "aten::mm", "aten::baddbmm", "aten::addmm")]
    assert len(products) == (3 if training else 1)
    assert all(T not in shape for shapes in products for shape in shapes)  # never the halo rows


@pytest.mark.parametrize("padding_idx", [0, -1])  # -1: the last row (49), which the ids use
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_word_embedding_gradient_comes_from_the_pool_and_is_torchs_bit_for_bit(monkeypatch, dtype, padding_idx):
    """The pooled lookup's weight gradient has the bits of torch's embedding backward (repeated ids, the padding id);
    autograd keeps the pool's buffer as .grad (no copy), which serves the next step once .grad is set to None; and
    accumulating into a kept .grad still adds."""
    from bigbird_ja.modeling import embedding_lookup

    monkeypatch.setattr(workspace.POOL, "min_bytes", 0)
    workspace.release_workspace()
    gen = torch.Generator().manual_seed(5)
    embedding = torch.nn.Embedding(50, 12, padding_idx=padding_idx).to(dtype)
    ids = torch.tensor([[3, 0, 7, 3, 3, 49], [0, 0, 7, 1, 2, 3]])
    upstream = torch.randn(2, 6, 12, generator=gen, dtype=dtype)
    (embedding(ids) * upstream).sum().backward()
    expected = embedding.weight.grad.clone()
    embedding.weight.grad = None
    storages = []
    for _ in range(3):
        out = embedding_lookup(embedding, ids)
        assert out.grad_fn is not None and "PooledEmbedding" in type(out.grad_fn).__name__
        (out * upstream).sum().backward()
        assert torch.equal(embedding.weight.grad, expected)
        storages.append(embedding.weight.grad.untyped_storage().data_ptr())
        assert storages[-1] in {b.untyped_storage().data_ptr() for b in workspace.POOL._buffers()}
        embedding.weight.grad = None
    assert len(set(storages)) == 1  # the same buffer step after step
    for _ in range(2):  # .grad kept: the second step's gradient (another buffer) is added into it
        (embedding_lookup(embedding, ids) * upstream).sum().backward()
    assert torch.equal(embedding.weight.grad, expected + expected)
    workspace.release_workspace()


def test_the_pooled_lookup_is_only_for_eager_cpu_training_of_a_plain_embedding(monkeypatch):
    from bigbird_ja.modeling import embedding_lookup

    ids = torch.tensor([[1, 2]])
    plain = torch.nn.Embedding(5, 3)
    assert "PooledEmbedding" in type(embedding_lookup(plain, ids).grad_fn).__name__
    with torch.no_grad():
        assert embedding_lookup(plain, ids).grad_fn is None
    for special in (torch.nn.Embedding(5, 3, max_norm=1.0), torch.nn.Embedding(5, 3, scale_grad_by_freq=True),
                    torch.nn.Embedding(5, 3, sparse=True)):
        assert "PooledEmbedding" not in type(embedding_lookup(special, ids).grad_fn).__name__
    frozen = torch.nn.Embedding(5, 3).requires_grad_(False)
    assert embedding_lookup(frozen, ids).grad_fn is None
    monkeypatch.setenv("BIGBIRD_JA_CPU_WORKSPACE", "0")
    assert "PooledEmbedding" not in type(embedding_lookup(plain, ids).grad_fn).__name__


def test_a_second_derivative_through_the_pooled_embedding_lookup_is_torchs():
    """create_graph=True takes torch's differentiable embedding backward: a gradient penalty through the lookup gives
    what it gives through nn.Embedding (before: refused as once-differentiable, or silently no graph)."""
    from bigbird_ja.modeling import embedding_lookup

    gen = torch.Generator().manual_seed(9)
    embedding = torch.nn.Embedding(20, 6, padding_idx=1).double()
    ids = torch.tensor([[1, 4, 4, 7]])
    upstream = torch.randn(1, 4, 6, generator=gen, dtype=torch.float64)

    def penalty(lookup):
        out = lookup(ids)
        (grad,) = torch.autograd.grad(((out * upstream).sum()) ** 2, embedding.weight, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), embedding.weight)[0]

    got = penalty(lambda i: embedding_lookup(embedding, i))
    torch.testing.assert_close(got, penalty(embedding), rtol=0, atol=1e-12)
    assert got.abs().sum() > 0
