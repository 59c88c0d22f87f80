"""The BigBird block layout: which key blocks each query block attends to.

Shapes: H heads, nb blocks, bs block size, g global blocks, nr = nb - g non-global (sparse) query blocks,
K = g + w + r key-block slots per sparse query block (w window, r random).

The layout is a pure function of (sparsity settings, layer, head, number of blocks). It keeps no state, touches no
global random generator, and is identical in training and evaluation and in every process: random blocks come from a
private `torch.Generator` seeded by a stable hash of (random_seed, layer, head, number of blocks).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SparsitySpec:
    """The fields of the config that decide the layout (hashable, so layouts can be cached)."""

    attention_type: str
    block_size: int
    num_window_blocks: int
    num_global_blocks: int
    num_random_blocks: int
    random_seed: int
    num_heads: int

    @classmethod
    def from_config(cls, config) -> "SparsitySpec":
        return cls(
            attention_type=config.attention_type,
            block_size=config.block_size,
            num_window_blocks=config.num_window_blocks,
            num_global_blocks=config.num_global_blocks,
            num_random_blocks=config.num_random_blocks,
            random_seed=config.random_seed,
            num_heads=config.num_attention_heads,
        )


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Block lists of one layer for one padded length.

    Query blocks [0, num_global_blocks) attend to every block. Query block `num_global_blocks + r` attends to the
    blocks `key_blocks[h, r, k]` for which `key_valid[h, r, k]` is True (each block at most once).
    """

    block_size: int
    num_blocks: int
    num_global_blocks: int
    key_blocks: torch.Tensor  # [H, nr, K] int64
    key_valid: torch.Tensor  # [H, nr, K] bool
    # Derived forms (e.g. the Triton backend's CSR lists per device), computed once per layout.
    cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_heads(self) -> int:
        return self.key_blocks.shape[0]

    def block_mask(self) -> torch.Tensor:
        """[H, nb, nb] bool: True where a query block attends to a key block."""
        H, nb, g = self.num_heads, self.num_blocks, self.num_global_blocks
        mask = torch.zeros(H, nb, nb, dtype=torch.bool)
        mask[:, :g, :] = True
        if nb > g:
            rows = torch.arange(g, nb).view(1, -1, 1).expand_as(self.key_blocks)
            heads = torch.arange(H).view(-1, 1, 1).expand_as(self.key_blocks)
            mask[heads[self.key_valid], rows[self.key_valid], self.key_blocks[self.key_valid]] = True
        return mask

    def token_mask(self, seq_len: int) -> torch.Tensor:
        """[H, seq_len, seq_len] bool at token level (the first seq_len tokens of the padded sequence)."""
        bs = self.block_size
        mask = self.block_mask().repeat_interleave(bs, dim=1).repeat_interleave(bs, dim=2)
        return mask[:, :seq_len, :seq_len].contiguous()

    def attended_blocks(self) -> int:
        """Number of (query block, key block) pairs summed over heads: the unit of the sparse FLOP count."""
        return int(self.num_global_blocks * self.num_blocks * self.num_heads + self.key_valid.sum())


def _stable_seed(*parts: int) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def num_blocks_for(seq_len: int, block_size: int) -> int:
    return max(1, -(-seq_len // block_size))


@functools.lru_cache(maxsize=256)
def build_layout(spec: SparsitySpec, layer_idx: int, num_blocks: int) -> BlockLayout:
    """Build (and cache) the layout of one layer for a sequence of `num_blocks` blocks."""
    H, nb = spec.num_heads, num_blocks
    g = nb if spec.attention_type == "full" else min(spec.num_global_blocks, nb)
    nr = nb - g
    half = spec.num_window_blocks // 2
    w, r = spec.num_window_blocks, spec.num_random_blocks
    if nr == 0:
        empty = torch.zeros(H, 0, g + w + r, dtype=torch.long)
        return BlockLayout(spec.block_size, nb, g, empty, empty.bool())

    rows = torch.arange(g, nb)  # query block index of each sparse row, [nr]
    global_slots = torch.arange(g).expand(nr, g)  # [nr, g]
    window_slots = rows[:, None] + torch.arange(-half, half + 1)[None, :]  # [nr, w]
    fixed = torch.cat([global_slots, window_slots], dim=1)  # [nr, g + w]
    fixed_valid = (fixed >= 0) & (fixed < nb)
    # A window block that is also global is listed once (as global).
    fixed_valid &= ~((fixed < g) & (torch.arange(g + w) >= g)[None, :])
    fixed = fixed.clamp(0, nb - 1)

    excluded = torch.zeros(nr, nb, dtype=torch.bool)  # blocks a random draw may not take
    excluded[:, :g] = True
    row_of_slot = torch.arange(nr)[:, None].expand_as(fixed)
    excluded[row_of_slot[fixed_valid], fixed[fixed_valid]] = True

    key_blocks, key_valid = [], []
    for head in range(H):
        gen = torch.Generator().manual_seed(_stable_seed(spec.random_seed, layer_idx, head, nb))
        keys = torch.rand(nr, nb, generator=gen).masked_fill(excluded, 2.0)
        k = min(r, nb)
        picked_key, picked = keys.topk(k, dim=1, largest=False)  # [nr, k]
        picked_valid = picked_key < 2.0
        if k < r:  # fewer blocks than slots: pad with invalid slots so every length has the same K
            picked = torch.cat([picked, torch.zeros(nr, r - k, dtype=torch.long)], dim=1)
            picked_valid = torch.cat([picked_valid, torch.zeros(nr, r - k, dtype=torch.bool)], dim=1)
        key_blocks.append(torch.cat([fixed, picked], dim=1))
        key_valid.append(torch.cat([fixed_valid, picked_valid], dim=1))
    return BlockLayout(spec.block_size, nb, g, torch.stack(key_blocks), torch.stack(key_valid))


def layout_for(config, layer_idx: int, seq_len: int) -> BlockLayout:
    """The layout of `layer_idx` for a sequence of `seq_len` tokens (padded internally to whole blocks)."""
    if not 0 <= layer_idx < config.num_hidden_layers:
        raise ValueError(f"layer_idx={layer_idx} is outside [0, num_hidden_layers={config.num_hidden_layers}).")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be at least 1.")
    spec = SparsitySpec.from_config(config)
    return build_layout(spec, layer_idx, num_blocks_for(seq_len, config.block_size))


def attention_mask(config, seq_len: int, layer_idx: int = 0) -> torch.Tensor:
    """`[num_attention_heads, seq_len, seq_len]` bool: True where a query attends to a key in layer `layer_idx`.

    This is the layout before padding: combine it with the key padding mask to get what is attended.
    """
    return layout_for(config, layer_idx, seq_len).token_mask(seq_len)
