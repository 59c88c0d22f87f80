"""The BigBird block layout: which key blocks each query block attends to.

Shapes: H heads, nb blocks, bs block size, g global blocks, nr = nb - g non-global (sparse) query blocks,
K = g + w + r key-block slots per sparse query block (w window, r random), M the random-block horizon (the blocks
of random_block_span, or of max_position_embeddings when it is not set).

The layout is a pure function of (sparsity settings, layer, head, number of blocks). It keeps no state, touches no
global random generator, and is identical in training and evaluation and in every process: random blocks come from a
counter-based hash of (random_seed, layer, head, query block, key block) in integer tensor ops, so the layout is also
built by ordinary traceable ops when the length is symbolic (torch.export, ONNX, torch.compile with dynamic shapes).

Batch invariance. The random blocks of a query block are drawn once, over the model's whole length (blocks
[0, M)), never over the padded length of a batch, and a layout of nb blocks keeps the drawn blocks that fall inside
it. So the layout of a sequence alone is the layout of the same sequence padded to any longer length, restricted to
its own blocks (the blocks past its end are padding, never attended): a sequence's outputs do not depend on the
rest of its batch. Any rule with that property and r slots per query block is of this kind (a fixed set per query
block, truncated to the length), so shorter inputs see fewer random blocks: about r * nb / M per query block.
"""

from __future__ import annotations

import functools
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
    # The slot order build_layout writes, so a backend can read the fixed slots as slices of k and v: slots [0, g)
    # are the blocks 0..g-1, the next num_window_blocks slots the blocks r - w//2 .. r + w//2 of query block r, the
    # rest random. 0: no such order is promised (every slot is read through key_blocks).
    num_window_blocks: int = 0
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


def num_blocks_for(seq_len, block_size: int):
    """Blocks of a `seq_len`-token sequence (at least one); `seq_len` may be a symbolic size under export."""
    if isinstance(seq_len, torch.SymInt):  # the model takes no empty sequence; no max() keeps the formula simple
        return (seq_len + block_size - 1) // block_size
    # not max(1, ...): dynamo hands a symbolic length over as an int, and a Max() in every size of the graph
    # leaves inductor's index arithmetic unsimplified (slow gathers and copies)
    return (seq_len + block_size - 1) // block_size if seq_len >= 1 else 1


# The random draw is a counter-based hash of (seed, layer, head, query block, key block) written in integer tensor
# ops (multiply, add, remainder; every intermediate below 2**63): no generator and no state, so it is the same in every
# process and traces as ordinary ops under torch.export, ONNX and torch.compile for a symbolic number of blocks.
_HASH_MODULUS = 2_147_483_647  # 2**31 - 1, a prime
_HASH_MULTIPLIERS = (48_271, 1_103_515_245, 69_621, 1_664_525_013, 950_706_376)


def _mix(state: torch.Tensor, multiplier: int) -> torch.Tensor:
    # An affine step and a squaring mod P: the square makes the hash nonlinear in its inputs (affine steps alone
    # would give every head the same ordering of blocks, shifted).
    state = (state * multiplier + 12_345) % _HASH_MODULUS
    return (state * state + 54_321) % _HASH_MODULUS


def _hash(*parts) -> torch.Tensor:
    """A pseudo-random int64 in [0, 2**31 - 1) for broadcastable integer tensors (or ints) `parts`."""
    state = torch.tensor(0, dtype=torch.long)
    for i, part in enumerate(parts):
        state = _mix(state + part % _HASH_MODULUS, _HASH_MULTIPLIERS[i % len(_HASH_MULTIPLIERS)])
    for multiplier in _HASH_MULTIPLIERS[:2]:
        state = _mix(state, multiplier)
    return state


# The draw holds a hash key for every (head, query block, candidate block): quadratic in the blocks, ~40 bytes each
# at its peak. Beyond this many (~10 GiB, a minute of CPU) a layout is refused with the fix rather than exhaust memory.
MAX_RANDOM_DRAW_ELEMENTS = 2 ** 28


def _random_blocks(spec: SparsitySpec, layer_idx: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawn random blocks of query blocks `rows` ([nr] int64): ([H, nr, r] int64 blocks, [H, nr, r] bool).

    Each query block q draws r distinct blocks uniformly from [0, M) less the global blocks and its window (False
    where fewer than r are left): the r smallest hash keys among the allowed blocks. Nothing here depends on a
    sequence's length, only on q, so rows past M (inputs longer than max_position_embeddings) are defined too."""
    H, M, r = spec.num_heads, spec.horizon_blocks, spec.num_random_blocks
    nr = rows.shape[0]
    if isinstance(nr, int) and H * nr * M > MAX_RANDOM_DRAW_ELEMENTS:  # (a symbolic length is bounded when run)
        raise ValueError(f"the random blocks of {nr:,} query blocks x {H} heads, drawn over {M:,} blocks, need "
                         f"{H} x {nr:,} x {M:,} hash keys, more than the limit of {MAX_RANDOM_DRAW_ELEMENTS:,} "
                         f"(~10 GiB): draw them over fewer blocks (a smaller random_block_span, e.g. 65536 tokens, "
                         f"or max_position_embeddings), or use shorter sequences")
    half = spec.num_window_blocks // 2
    columns = torch.arange(M)  # candidate key blocks
    excluded = (columns[None, :] < spec.num_global_blocks) | ((columns[None, :] - rows[:, None]).abs() <= half)
    heads = torch.arange(H).view(H, 1, 1)
    seed = spec.random_seed % _HASH_MODULUS
    keys = _hash(seed, layer_idx, heads, rows.view(1, -1, 1), columns.view(1, 1, M)) * M + columns  # distinct per row
    never = _HASH_MODULUS * M  # above every key
    keys = keys.masked_fill(excluded.unsqueeze(0), never)
    k = min(r, M)
    picked_key, picked = keys.topk(k, dim=-1, largest=False)  # [H, nr, k]
    valid = picked_key < never
    if k < r:  # fewer blocks than slots: pad with invalid slots so every length has the same K
        picked = torch.cat([picked, picked.new_zeros(*picked.shape[:2], r - k)], dim=2)
        valid = torch.cat([valid, valid.new_zeros(*valid.shape[:2], r - k)], dim=2)
    return picked, valid


def build_layout(spec: SparsitySpec, layer_idx: int, num_blocks) -> BlockLayout:
    """The layout of one layer for a sequence of `num_blocks` blocks (cached; built afresh for a symbolic size).

    Global blocks and windows are cut at `num_blocks`; so are the random blocks, which were drawn over the model's
    whole length (`_random_blocks`): a slot whose block lies past the end is invalid (a padding block)."""
    if isinstance(num_blocks, torch.SymInt):
        # Traced with a dynamic length (torch.export, ONNX, torch.compile(dynamic=True)): the same tensor ops on a
        # symbolic number of blocks. The graph needs at least one sparse query block (more blocks than global ones).
        if spec.attention_type != "full":
            torch._check(num_blocks > spec.num_global_blocks)
        return _build_layout(spec, layer_idx, num_blocks)
    return _cached_layout(spec, layer_idx, num_blocks)


@functools.lru_cache(maxsize=256)
def _cached_layout(spec: SparsitySpec, layer_idx: int, num_blocks: int) -> BlockLayout:
    return _build_layout(spec, layer_idx, num_blocks)


def _build_layout(spec: SparsitySpec, layer_idx: int, num_blocks) -> BlockLayout:
    H, nb = spec.num_heads, num_blocks
    if spec.attention_type == "full":
        g = nb
    elif isinstance(nb, torch.SymInt):
        g = spec.num_global_blocks  # nb > g was checked above
    else:  # a branch, not min(): under torch.compile nb may be symbolic here too, and g then stays a constant
        g = spec.num_global_blocks if nb > spec.num_global_blocks else nb
    nr = nb - g
    half = spec.num_window_blocks // 2
    w, r = spec.num_window_blocks, spec.num_random_blocks
    if nr == 0:
        # no sparse rows; full attention reads no slots (its window and random settings are unused, and unchecked)
        empty = torch.zeros(H, 0, g if spec.attention_type == "full" else g + w + r, dtype=torch.long)
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
        return BlockLayout(spec.block_size, nb, g, fixed.contiguous(), fixed_valid.contiguous(), w)
    picked, picked_valid = _random_blocks(spec, layer_idx, rows)  # [H, nr, r]
    picked_valid = picked_valid & (picked < nb)  # drawn past this length: a padding block, not attended
    picked = picked.masked_fill(~picked_valid, 0)  # any in-range index: the slot is invalid
    key_blocks = torch.cat([fixed, picked], dim=2)  # [H, nr, K]
    return BlockLayout(spec.block_size, nb, g, key_blocks, torch.cat([fixed_valid, picked_valid], dim=2), w)


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
