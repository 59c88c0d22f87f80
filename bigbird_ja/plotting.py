"""Draw a config's attention layout the way the BigBird paper does: one cell per (query block, key block),
coloured by why it is attended (global, window, random)."""

from __future__ import annotations

from pathlib import Path

import torch

from .attention import SparsitySpec, layout_for

CATEGORY_NAMES = ("not attended", "global", "window", "random")
CATEGORY_COLOURS = ("#f4f4f4", "#d1495b", "#00798c", "#edae49")


def block_categories(config, seq_len: int, layer_idx: int = 0) -> torch.Tensor:
    """[H, nb, nb] int: 0 not attended, 1 global, 2 window, 3 random."""
    layout = layout_for(config, layer_idx, seq_len)
    attended = layout.block_mask()  # [H, nb, nb]
    nb, g = layout.num_blocks, layout.num_global_blocks
    q = torch.arange(nb)[:, None]
    kb = torch.arange(nb)[None, :]
    is_global = (q < g) | (kb < g)
    is_window = (q - kb).abs() <= layout.num_window_blocks // 2  # the layout's (none in full attention)
    categories = torch.full(attended.shape, 3, dtype=torch.long)
    categories[:, is_window.expand(nb, nb)] = 2
    categories[:, is_global.expand(nb, nb)] = 1
    return categories.masked_fill(~attended, 0)


def draw_layout(config, seq_len: int, out, layer_idx: int = 0, head: int | None = None) -> Path:
    """Write a PNG of one head (`head`) or of all heads as a grid (head=None); return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError("drawing layouts needs matplotlib: pip install 'bigbird-ja[plot]'") from err
    categories = block_categories(config, seq_len, layer_idx)
    H = categories.shape[0]
    if head is not None and not 0 <= head < H:
        raise ValueError(f"head={head} is outside [0, {H}).")
    heads = [head] if head is not None else list(range(H))
    cols = min(4, len(heads))
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.2 * cols, 5.6), 3.2 * rows + 0.8), squeeze=False)
    cmap = ListedColormap(CATEGORY_COLOURS)
    for ax in axes.flat:
        ax.axis("off")
    for ax, h in zip(axes.flat, heads):
        ax.imshow(categories[h].numpy(), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("key block", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)
    nb = categories.shape[-1]
    horizon = SparsitySpec.from_config(config).horizon_blocks
    # random blocks are drawn over the model's whole length: a shorter input shows those that fall inside it
    fig.suptitle(f"{config.attention_type} layout, layer {layer_idx}: {seq_len} tokens = {nb} blocks of "
                 f"{config.block_size}\n(window {config.num_window_blocks}, global {config.num_global_blocks}, "
                 f"random {config.num_random_blocks} drawn over {horizon} blocks)", fontsize=9)
    fig.legend(handles=[Patch(color=c, label=n) for c, n in zip(CATEGORY_COLOURS, CATEGORY_NAMES)],
               loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.04, 1, 0.95))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
