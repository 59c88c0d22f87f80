"""The BigBird block layout: which key blocks each query block attends to.

Shapes: H heads, nb blocks, bs block size, g global blocks, nr = nb - g non-global (sparse) query blocks,
K = g + w + r key-block slots per sparse query block (w window, r random), M the random-block horizon (the blocks
of random_block_span, or of max_position_embeddings when it is not set).

The layout is a pure function of (sparsity settings, layer, head, number of blocks). It keeps no state, touches no
global random generator, and is identical in training and evaluation and in every process: random blocks come from a
private `torch.Generator` seeded by a stable hash of (random_seed, layer, head, M, row chunk).

Batch invariance. The random blocks of a query block are drawn once, over the model's whole length (blocks
[0, M)), never over the padded length of a batch, and a layout of nb blocks keeps the drawn blocks that fall inside
it. So the layout of a sequence alone is the layout of the same sequence padded to any longer length, restricted to
its own blocks (the blocks past its end are padding, never attended): a sequence's outputs do not depend on the
rest of its batch. Any rule with that property and r slots per query block is of this kind (a fixed set per query
block, truncated to the length), so shorter inputs see fewer random blocks: about r * nb / M per query block.
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
    horizon_blocks: int  # M: random blocks are drawn over blocks [0, M) (random_block_span or max_position_embeddings)

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
            horizon_blocks=num_blocks_for(config.random_block_span or config.max_position_embeddings,
                                          config.block_size),
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
def _drawn_random_blocks(spec: SparsitySpec, layer_idx: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random blocks of query blocks [chunk * M, (chunk + 1) * M): ([H, M, r] int64 blocks, [H, M, r] bool).

    Each query block q draws r distinct blocks uniformly from [0, M) less the global blocks and its window (False
    where fewer than r are left). Nothing here depends on a sequence's length; rows past M (inputs longer than
    max_position_embeddings) draw from the same [0, M), in further chunks, so every row is defined and fixed."""
    H, M, r = spec.num_heads, spec.horizon_blocks, spec.num_random_blocks
    half = spec.num_window_blocks // 2
    rows = torch.arange(chunk * M, (chunk + 1) * M)[:, None]  # [M, 1] query blocks
    columns = torch.arange(M)[None, :]  # [1, M] candidate key blocks
    excluded = (columns < spec.num_global_blocks) | ((columns - rows).abs() <= half)  # [M, M]
    k = min(r, M)
    blocks, valid = [], []
    for head in range(H):
        gen = torch.Generator().manual_seed(_stable_seed(spec.random_seed, layer_idx, head, M, chunk))
        keys = torch.rand(M, M, generator=gen).masked_fill(excluded, 2.0)
        picked_key, picked = keys.topk(k, dim=1, largest=False)  # [M, k]
        blocks.append(picked)
        valid.append(picked_key < 2.0)
    blocks, valid = torch.stack(blocks), torch.stack(valid)  # [H, M, k]
    if k < r:  # fewer blocks than slots: pad with invalid slots so every length has the same K
        blocks = torch.cat([blocks, torch.zeros(H, M, r - k, dtype=torch.long)], dim=2)
        valid = torch.cat([valid, torch.zeros(H, M, r - k, dtype=torch.bool)], dim=2)
    return blocks, valid


def _random_blocks(spec: SparsitySpec, layer_idx: int, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawn random blocks of query blocks [first, last): ([H, last - first, r], [H, last - first, r])."""
    M = spec.horizon_blocks
    chunks = [_drawn_random_blocks(spec, layer_idx, c) for c in range(first // M, (last - 1) // M + 1)]
    offset = (first // M) * M
    blocks = torch.cat([b for b, _ in chunks], dim=1)[:, first - offset:last - offset]
    valid = torch.cat([v for _, v in chunks], dim=1)[:, first - offset:last - offset]
    return blocks, valid


@functools.lru_cache(maxsize=256)
def build_layout(spec: SparsitySpec, layer_idx: int, num_blocks: int) -> BlockLayout:
    """Build (and cache) the layout of one layer for a sequence of `num_blocks` blocks.

    Global blocks and windows are cut at `num_blocks`; so are the random blocks, which were drawn over the model's
    whole length (`_drawn_random_blocks`): a slot whose block lies past the end is invalid (a padding block)."""
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
    fixed, fixed_valid = fixed.expand(H, nr, g + w), fixed_valid.expand(H, nr, g + w)

    if r == 0:
        return BlockLayout(spec.block_size, nb, g, fixed.contiguous(), fixed_valid.contiguous())
    picked, picked_valid = _random_blocks(spec, layer_idx, g, nb)  # [H, nr, r]
    picked_valid = picked_valid & (picked < nb)  # drawn past this length: a padding block, not attended
    picked = picked.masked_fill(~picked_valid, 0)  # any in-range index: the slot is invalid
    key_blocks = torch.cat([fixed, picked], dim=2)  # [H, nr, K]
    return BlockLayout(spec.block_size, nb, g, key_blocks, torch.cat([fixed_valid, picked_valid], dim=2))


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
