"""Triton backend: the autograd wiring around bigbird_ja_kernels (which hold no autograd).

The chain, top to bottom: `triton_attention` (pads, projects the relative buckets, validates) ->
`BlockSparseAttentionFunction` (autograd.Function) -> `torch.ops.bigbird_ja.block_sparse_{fwd,bwd}` (custom ops
with fake implementations, so torch.compile treats the kernels as opaque calls) -> the launchers in
`bigbird_ja_kernels.block_sparse`.

The per-bucket projections qp = (scale q) @ pos_key^T and kp = k @ (scale pos_query)^T are ordinary PyTorch ops
([B, H, Np, 2S]); the kernels gather from them and scatter their gradients back, and autograd carries those
gradients on to q, k and the relative embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import BlockLayout
from .relative import RelativePositionSpec, relative_index_table


def _kernels():
    """The `bigbird_ja_kernels` module, imported when first needed: importing bigbird_ja must not import triton, and
    the copy of this file in a saved model folder (`bigbird_ja.hub`) must load where the kernels are not installed
    (transformers refuses remote code that imports a missing package anywhere but inside a try block)."""
    try:
        import bigbird_ja_kernels
    except ImportError as err:
        raise ImportError(f"the Triton backend needs triton and the bigbird_ja_kernels package ({err}): pip install "
                          "-e '.[triton]', or use attention_backend='blocked' (pure PyTorch, any device).") from err
    return bigbird_ja_kernels


def kernels_importable() -> bool:
    try:
        _kernels()
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """`bigbird_ja_kernels.interpreting()`, imported when asked (importing bigbird_ja must not import triton), so
    call it after `kernels_importable()`."""
    return _kernels().interpreting()


def layout_csr(layout: BlockLayout, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(row_ptr, col_idx, t_row_ptr, t_col_idx) int32: key blocks per query block and its transpose, CSR over
    rows h * nb + block. Cached on the layout (layouts themselves are cached per layer and length)."""
    key = ("csr", str(device))
    if key not in layout.cache:
        mask = layout.block_mask()  # [H, nb, nb]
        tensors = []
        for m in (mask, mask.transpose(1, 2)):
            counts = m.sum(-1).flatten()
            row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            col_idx = m.nonzero()[:, 2]  # nonzero() is sorted by (head, row, column)
            tensors += [row_ptr.to(device, torch.int32), col_idx.to(device, torch.int32)]
        layout.cache[key] = tuple(tensors)
    return layout.cache[key]


# --- custom ops: opaque to torch.compile, with shapes given by their fake implementations -----------------------
@torch.library.custom_op("bigbird_ja::block_sparse_fwd", mutates_args=())
def _block_sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qp: torch.Tensor | None,
                      kp: torch.Tensor | None, rel_table: torch.Tensor, key_valid: torch.Tensor,
                      row_ptr: torch.Tensor, col_idx: torch.Tensor, layout_block: int, dropout_p: float,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().block_sparse_forward(q, k, v, qp, kp, rel_table, key_valid, row_ptr, col_idx, layout_block,
                                           dropout_p, seed)


@_block_sparse_fwd.register_fake
def _(q, k, v, qp, kp, rel_table, key_valid, row_ptr, col_idx, layout_block, dropout_p, seed):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("bigbird_ja::block_sparse_bwd", mutates_args=())
def _block_sparse_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qp: torch.Tensor | None,
                      kp: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, rel_table: torch.Tensor,
                      key_valid: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                      t_row_ptr: torch.Tensor, t_col_idx: torch.Tensor, layout_block: int, dropout_p: float,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dqp, dkp = _kernels().block_sparse_backward(do, q, k, v, qp, kp, out, lse, rel_table, key_valid,
                                                            row_ptr, col_idx, t_row_ptr, t_col_idx, layout_block,
                                                            dropout_p, seed)
    # Custom ops return tensors, not None (and no two outputs may be one tensor): absent gradients are empty.
    return (dq, dk, dv, dqp.to(qp.dtype) if dqp is not None else q.new_empty(0),
            dkp.to(kp.dtype) if kp is not None else q.new_empty(0))


@_block_sparse_bwd.register_fake
def _(do, q, k, v, qp, kp, out, lse, rel_table, key_valid, row_ptr, col_idx, t_row_ptr, t_col_idx, layout_block,
      dropout_p, seed):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(qp) if qp is not None else q.new_empty(0),
            torch.empty_like(kp) if kp is not None else q.new_empty(0))


class BlockSparseAttentionFunction(torch.autograd.Function):
    """out = block-sparse softmax(q k^T + gathered qp + gathered kp) v on padded, contiguous inputs."""

    @staticmethod
    def forward(ctx, q, k, v, qp, kp, rel_table, key_valid, row_ptr, col_idx, t_row_ptr, t_col_idx, layout_block,
                dropout_p, seed):
        out, lse = torch.ops.bigbird_ja.block_sparse_fwd(q, k, v, qp, kp, rel_table, key_valid, row_ptr, col_idx,
                                                         layout_block, dropout_p, seed)
        ctx.save_for_backward(q, k, v, qp, kp, out, lse, rel_table, key_valid, row_ptr, col_idx, t_row_ptr,
                              t_col_idx)
        ctx.layout_block, ctx.dropout_p, ctx.seed = layout_block, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, qp, kp, out, lse, rel_table, key_valid, row_ptr, col_idx, t_row_ptr, t_col_idx = ctx.saved_tensors
        dq, dk, dv, dqp, dkp = torch.ops.bigbird_ja.block_sparse_bwd(
            dout.contiguous(), q, k, v, qp, kp, out, lse, rel_table, key_valid, row_ptr, col_idx, t_row_ptr,
            t_col_idx, ctx.layout_block, ctx.dropout_p, ctx.seed)
        return (dq, dk, dv, dqp if qp is not None else None, dkp if kp is not None else None,
                None, None, None, None, None, None, None, None, None)


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    pos_key: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None,
    rel_spec: RelativePositionSpec | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The reference's function on the Triton kernels (same arguments as `blocked_attention`).

    Attention dropout runs inside the kernels: its mask is a function of a seed drawn from torch's CPU generator
    (so `torch.manual_seed` reproduces it, and activation checkpointing replays it) and of (batch*head, query, key).
    """
    B, H, N, D = q.shape
    bs, nb = layout.block_size, layout.num_blocks
    _kernels().check_supported(D, bs)
    Np, dev = nb * bs, q.device
    pad = Np - N
    q_scaled = q * scale
    q_scaled, k, v = (F.pad(t, (0, 0, 0, pad)).contiguous() for t in (q_scaled, k, v))
    valid = torch.ones(B, N, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask.bool()
    key_valid = F.pad(valid, (0, pad), value=False).to(torch.int8).contiguous()
    qp = kp = None
    if pos_key is not None or pos_query is not None:
        rel_table = relative_index_table(Np, rel_spec, dev).to(torch.int32)
        if pos_key is not None:
            qp = (q_scaled @ pos_key.transpose(-1, -2).unsqueeze(0)).contiguous()  # [B, H, Np, 2S]
        if pos_query is not None:
            kp = (k @ (pos_query * scale).transpose(-1, -2).unsqueeze(0)).contiguous()  # [B, H, Np, 2S]
    else:
        rel_table = torch.zeros(1, dtype=torch.int32, device=dev)
    row_ptr, col_idx, t_row_ptr, t_col_idx = layout_csr(layout, dev)
    dropout = float(dropout_p) if training and dropout_p > 0 else 0.0
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout > 0 else 0
    out = BlockSparseAttentionFunction.apply(q_scaled, k, v, qp, kp, rel_table, key_valid, row_ptr, col_idx,
                                             t_row_ptr, t_col_idx, bs, dropout, seed)
    return out[:, :, :N]
