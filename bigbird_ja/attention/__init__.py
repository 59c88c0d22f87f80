"""The attention op of bigbird-ja: DeBERTa-v2 disentangled attention on the BigBird block layout.

One definition (`reference.py`), several backends that compute it:
  reference  dense scores with the layout mask, O(N^2): the truth for tests
  blocked    gathered key/value blocks in pure PyTorch, memory linear in N: the default on CPU
  triton     fused Triton kernels (the `bigbird_ja_kernels` package under kernels/), CUDA; on CPU only under
             TRITON_INTERPRET=1 (for tests)
  flex       torch's FlexAttention (a BlockMask from the layout plus a score_mod), compiled on GPUs, including those
             the Triton kernels have not met; on CPU uncompiled and forward only (dense math). No attention dropout.
             Never chosen by "auto".

`disentangled_attention` validates its inputs and dispatches; the model calls nothing else.
"""

from __future__ import annotations

import torch

from .blocked import blocked_attention
from .dropout import HashedDropout
from .layout import BlockLayout, SparsitySpec, attention_mask, build_layout, layout_for, num_blocks_for
from .reference import masked_softmax, reference_attention
from .relative import RelativePositionSpec, log_bucket_position, relative_index_table
from .workspace import release_workspace, workspace_scope

__all__ = [
    "BlockLayout", "HashedDropout", "RelativePositionSpec", "SparsitySpec", "attention_mask", "blocked_attention",
    "build_layout", "disentangled_attention", "layout_for", "log_bucket_position", "masked_softmax", "num_blocks_for",
    "reference_attention", "relative_index_table", "release_workspace", "workspace_scope", "resolve_backend",
]


def resolve_backend(requested: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for `device`; refuse one that cannot run there.

    "auto" is `triton` on CUDA when the kernels are installed, and `blocked` otherwise. On the meta device (shapes
    only: the planner's memory count) `triton` is taken as asked: its custom ops have meta implementations.
    """
    from .triton_backend import interpreting, kernels_importable

    if requested == "auto":
        if device.type == "cuda" and kernels_importable():
            return "triton"
        return "blocked"
    if requested == "triton":
        if device.type == "meta":
            return "triton"
        if not kernels_importable():
            raise ImportError("attention_backend='triton' needs triton and the bigbird_ja_kernels package (pip "
                               "install -e '.[triton]'); use attention_backend='blocked' (pure PyTorch, any device).")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"attention_backend='triton' runs on CUDA devices, not {device.type} (set "
                               "TRITON_INTERPRET=1 only to test the kernels); use attention_backend='blocked'.")
        return "triton"
    if requested == "flex":
        from .flex_backend import flex_available

        if not flex_available():
            raise ImportError(f"attention_backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5; this "
                              f"is {torch.__version__}); use attention_backend='blocked'.")
        return "flex"
    if requested not in ("reference", "blocked"):
        raise ValueError(f"attention_backend={requested!r}: must be 'auto', 'reference', 'blocked', 'triton' or "
                         "'flex'.")
    return requested


def disentangled_attention(
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
    backend: str = "auto",
) -> torch.Tensor:
    """Block-sparse disentangled attention.

    Args:
        q, k, v: [B, H, N, D], same dtype and device.
        layout: the layer's `BlockLayout` for N tokens (`layout_for(config, layer, N)`).
        key_padding_mask: [B, N], True (or 1) for real tokens; padding is never attended to. None: no padding.
        scale: multiplies every score (DeBERTa: 1 / sqrt(D * (1 + number of relative terms))).
        pos_key: [H, 2S, D] relative keys (enables content-to-position), or None.
        pos_query: [H, 2S, D] relative queries (enables position-to-content), or None.
        rel_spec: the relative-position buckets; required with pos_key or pos_query.
        dropout_p, training: dropout on the attention probabilities.
        backend: "auto", "reference", "blocked", "triton" or "flex".
    Returns:
        [B, H, N, D]; a query with no attendable key (a fully padded row) gets zeros.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    B, H, N, D = q.shape
    if layout.num_heads != H or layout.num_blocks != num_blocks_for(N, layout.block_size):
        raise ValueError(f"layout is for {layout.num_heads} heads and {layout.num_blocks} blocks of "
                         f"{layout.block_size}; inputs have {H} heads and {N} tokens. Build it with layout_for().")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask must be [B, N] = [{B}, {N}]; got {tuple(key_padding_mask.shape)}.")
    for name, pos in (("pos_key", pos_key), ("pos_query", pos_query)):
        if pos is not None:
            if rel_spec is None:
                raise ValueError(f"{name} given without rel_spec.")
            if tuple(pos.shape) != (H, 2 * rel_spec.span, D) or pos.dtype != q.dtype:
                raise ValueError(f"{name} must be [H, 2S, D] = [{H}, {2 * rel_spec.span}, {D}] in {q.dtype}; got "
                                 f"{tuple(pos.shape)} in {pos.dtype}.")
    kwargs = dict(scale=scale, pos_key=pos_key, pos_query=pos_query, rel_spec=rel_spec, dropout_p=dropout_p,
                  training=training)
    chosen = resolve_backend(backend, q.device)
    if chosen == "reference":
        return reference_attention(q, k, v, layout.token_mask(N).to(q.device), key_padding_mask, **kwargs)
    if chosen == "triton":
        from .triton_backend import triton_attention

        return triton_attention(q, k, v, layout, key_padding_mask, **kwargs)
    if chosen == "flex":
        from .flex_backend import flex_attention_backend

        return flex_attention_backend(q, k, v, layout, key_padding_mask, **kwargs)
    return blocked_attention(q, k, v, layout, key_padding_mask, **kwargs)
