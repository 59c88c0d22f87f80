"""bigbird_ja_kernels: fused Triton kernels for bigbird-ja's block-sparse disentangled attention.

Importing this package imports triton. The kernels hold no autograd; `bigbird_ja.attention.triton_backend`
wraps `block_sparse_forward` / `block_sparse_backward` in an `autograd.Function`.
"""

from .block_sparse import (
    KERNELS,
    SUPPORTED_HEAD_DIMS,
    SUPPORTED_LAYOUT_BLOCKS,
    block_sparse_backward,
    block_sparse_forward,
    check_supported,
    dropout_keep_mask,
    interpreting,
)

__all__ = ["KERNELS", "SUPPORTED_HEAD_DIMS", "SUPPORTED_LAYOUT_BLOCKS", "block_sparse_backward",
           "block_sparse_forward", "check_supported", "dropout_keep_mask", "interpreting"]
