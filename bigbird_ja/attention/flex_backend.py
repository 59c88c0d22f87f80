"""FlexAttention backend: the reference's function as a BlockMask from the layout plus a score_mod.

Shapes: B batch, H heads, N tokens, D head dim, S relative span (relative embeddings have 2S rows), bs the layout's
block size, nb its blocks, m the mask's block size (a multiple of bs), nm = ceil(N / m) mask blocks.

The same maths as `reference.py`, in FlexAttention's terms (torch.nn.attention.flex_attention):

    score_mod(score, b, h, i, j) = score + s * (qp[b, h, i, delta(i, j)] + kp[b, h, j, delta(i, j)])
        with qp = q @ pos_key^T and kp = k @ pos_query^T, [B, H, N, 2S] (the per-bucket c2p and p2c products,
        computed once, O(N) memory), and Flex's own s * q_i . k_j as `score`;
    mask_mod(b, h, i, j)         = layout[h, i // bs, j // bs] and key_padding_mask[b, j]
    BlockMask                    = the layout's (query block, key block) pairs on m-token tiles: tiles wholly
        attended with no padding key are "full" (mask_mod skipped), the other attended tiles "partial".

Flex gives a query with no attendable key zeros, as the reference does. Gradients reach q, k, v and, through the
captured qp and kp, pos_key and pos_query.

Where it runs (torch 2.13). On CUDA (and other Flex devices) the call is compiled (`torch.compile(flex_attention)`):
fused kernels that visit the BlockMask's tiles only. On CPU it runs uncompiled, which is Flex's dense math
(O(N^2) memory, any float dtype, float64 included): a reference point for tests and small inputs. `compiled=True`
runs inductor's CPU Flex kernel instead (float32/bfloat16, one build per shape). Both are forward only: torch has no
Flex backward on CPU, so a CPU call that needs gradients is refused with the fix.

Tiles. m = max(bs, 128): Flex's default tiles on Hopper are 128 tokens and refuse a mask on smaller blocks; the
mask_mod keeps the function exact to the token whatever m is.

Dropout. Flex has no attention dropout; training with dropout_p > 0 is refused (set attention_probs_dropout_prob=0
or use another backend), never silently run without it.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .layout import BlockLayout
from .relative import RelativePositionSpec, relative_index_table

MIN_MASK_BLOCK = 128  # Flex's default tile on Hopper: a BlockMask on smaller blocks has no default tiles there


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_flex(dynamic: bool | None):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


def flex_block_mask(layout: BlockLayout, key_padding_mask: torch.Tensor | None, batch: int, seq_len: int,
                    device: torch.device, mask_block: int | None = None):
    """The BlockMask of `layout` for `batch` rows of `seq_len` tokens, on `mask_block`-token tiles.

    Returns a `BlockMask` (kv lists of shape [B, H, nm, nm]) whose mask_mod is exact to the token."""
    from torch.nn.attention.flex_attention import BlockMask

    H, bs, nb = layout.num_heads, layout.block_size, layout.num_blocks
    m = mask_block or max(bs, MIN_MASK_BLOCK)
    if m % bs:
        raise ValueError(f"mask_block={m} must be a multiple of the layout's block size {bs}.")
    f, nm = m // bs, -(-seq_len // m)
    key = ("flex_block_mask", str(device))  # one copy per layout and device, not one transfer per call
    if key not in layout.cache:
        layout.cache[key] = layout.block_mask().to(device)
    blocks = layout.cache[key]  # [H, nb, nb]
    # Layout blocks on m-token tiles: pad to nm * f blocks (extra blocks lie past the end, never attended).
    tiled = torch.zeros(H, nm * f, nm * f, dtype=torch.bool, device=device)
    tiled[:, :nb, :nb] = blocks
    tiled = tiled.view(H, nm, f, nm, f)
    any_pair, all_pairs = tiled.any(dim=(2, 4)), tiled.all(dim=(2, 4))  # [H, nm, nm]
    real = torch.zeros(batch, nm * m, dtype=torch.bool, device=device)  # [B, nm * m]: real keys
    real[:, :seq_len] = True if key_padding_mask is None else key_padding_mask.to(device).bool()
    key_tile_real = real.view(batch, nm, m).all(dim=-1)  # [B, nm]
    full = all_pairs.unsqueeze(0) & key_tile_real[:, None, None, :]  # [B, H, nm, nm]
    partial = any_pair.unsqueeze(0) & ~full

    def lists(tiles):  # Flex's kv form: a count per query tile and the attended key tiles first
        order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
        return tiles.sum(-1).to(torch.int32), order.to(torch.int32)

    key_real = real[:, :seq_len]

    def mask_mod(b, h, q_idx, kv_idx):
        return blocks[h, q_idx // bs, kv_idx // bs] & key_real[b, kv_idx]

    return BlockMask.from_kv_blocks(*lists(partial), *lists(full), BLOCK_SIZE=m, mask_mod=mask_mod,
                                    seq_lengths=(seq_len, seq_len))


def flex_attention_backend(
    q: torch.Tensor,  # [B, H, N, D]
    k: torch.Tensor,  # [B, H, N, D]
    v: torch.Tensor,  # [B, H, N, D]
    layout: BlockLayout,
    key_padding_mask: torch.Tensor | None,  # [B, N], True = real token
    scale: float,
    pos_key: torch.Tensor | None = None,  # [H, 2S, D], enables c2p
    pos_query: torch.Tensor | None = None,  # [H, 2S, D], enables p2c
    rel_spec: RelativePositionSpec | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    compiled: bool | None = None,
) -> torch.Tensor:
    """`reference_attention`'s function through FlexAttention; returns [B, H, N, D] (inputs checked by the caller).

    compiled: run `torch.compile(flex_attention)`; None compiles everywhere but on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    if training and dropout_p > 0:
        raise ValueError(f"attention_backend='flex' has no attention dropout (dropout_p={dropout_p} in training): "
                         "set attention_probs_dropout_prob=0, or use attention_backend='blocked' or 'triton'.")
    if not torch.is_grad_enabled():  # Flex refuses inputs that require grad on CPU even when no graph is recorded
        q, k, v = q.detach(), k.detach(), v.detach()
    B, H, N, D = q.shape
    block_mask = flex_block_mask(layout, key_padding_mask, B, N, q.device)
    score_mod = None
    if pos_key is not None or pos_query is not None:
        table = relative_index_table(N, rel_spec, q.device)  # [2N - 1]: delta(i, j) at i - j + N - 1
        offset = N - 1
        # The per-bucket products, scaled here because Flex scales q.k before score_mod.
        qp = (q @ pos_key.transpose(-1, -2).unsqueeze(0)) * scale if pos_key is not None else None  # [B, H, N, 2S]
        kp = (k @ pos_query.transpose(-1, -2).unsqueeze(0)) * scale if pos_query is not None else None

        def score_mod(score, b, h, q_idx, kv_idx):
            delta = table[q_idx - kv_idx + offset]
            if qp is not None:
                score = score + qp[b, h, q_idx, delta]
            if kp is not None:
                score = score + kp[b, h, kv_idx, delta]
            return score

    if compiled is None:
        compiled = q.device.type != "cpu"
    # On CPU one build per shape: inductor's CPU Flex kernel fails to compile for dynamic shapes (torch 2.13).
    attend = _compiled_flex(False if q.device.type == "cpu" else None) if compiled else flex_attention
    try:
        with warnings.catch_warnings():  # uncompiled is chosen (the dense math on CPU), not an oversight to warn of
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    except NotImplementedError as err:
        if q.device.type == "cpu" and "backward on CPU" in str(err):
            raise NotImplementedError(
                "attention_backend='flex' has no backward on CPU in this torch (FlexAttention runs forward only "
                "there): run under torch.no_grad() for inference, or use attention_backend='blocked' on CPU and "
                "'flex' on CUDA for training.") from err
        raise
