import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import bigbird_ja
from conftest import tiny_config


def blocks_of(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """[H, N, N] token mask -> [H, nb, nb] block mask (a block pair is attended if any token pair is)."""
    H, N, _ = mask.shape
    nb = -(-N // block_size)
    padded = torch.zeros(H, nb * block_size, nb * block_size, dtype=torch.bool)
    padded[:, :N, :N] = mask
    return padded.view(H, nb, block_size, nb, block_size).any(dim=(2, 4))


@pytest.mark.parametrize("seq_len", [1, 7, 8, 9, 63, 64, 65, 200, 517, 1024])
@pytest.mark.parametrize("sparsity", [(3, 1, 2), (5, 2, 1), (1, 0, 3), (3, 2, 0)])
def test_attention_mask_follows_the_bigbird_rules(seq_len, sparsity):
    window, n_global, n_random = sparsity
    config = tiny_config(num_window_blocks=window, num_global_blocks=n_global, num_random_blocks=n_random)
    bs = config.block_size
    horizon = config.max_position_embeddings // bs  # random blocks are drawn over the model's whole length
    for layer in range(config.num_hidden_layers):
        mask = bigbird_ja.attention_mask(config, seq_len, layer)
        assert mask.shape == (config.num_attention_heads, seq_len, seq_len) and mask.dtype == torch.bool
        # The mask is whole blocks: every token pair of a block pair agrees.
        blocks = blocks_of(mask, bs)
        expanded = blocks.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :seq_len, :seq_len]
        assert torch.equal(mask, expanded)
        at_max_length = blocks_of(bigbird_ja.attention_mask(config, config.max_position_embeddings, layer), bs)
        nb = blocks.shape[-1]
        g = min(n_global, nb)
        for head in range(config.num_attention_heads):
            for q in range(nb):
                seen = set(torch.nonzero(blocks[head, q]).flatten().tolist())
                if q < g:
                    assert seen == set(range(nb))
                    continue
                window_blocks = set(range(q - window // 2, q + window // 2 + 1))
                fixed = {b for b in set(range(g)) | window_blocks if 0 <= b < nb}
                assert fixed <= seen
                # the row's random blocks: drawn once over the whole length, never global or window blocks...
                fixed_at_max = {b for b in set(range(n_global)) | window_blocks if 0 <= b < horizon}
                drawn = set(torch.nonzero(at_max_length[head, q]).flatten().tolist()) - fixed_at_max
                assert len(drawn) == min(n_random, horizon - len(fixed_at_max))
                # ... and kept where they fall inside this length
                assert seen - fixed == {b for b in drawn if b < nb}


def test_random_blocks_differ_between_heads_and_layers_but_not_between_calls():
    config = tiny_config(num_attention_heads=4, num_hidden_layers=3, num_random_blocks=2)
    masks = [bigbird_ja.attention_mask(config, 400, layer) for layer in range(3)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert not torch.equal(masks[0][0], masks[0][1])
    assert torch.equal(masks[1], bigbird_ja.attention_mask(config, 400, 1))
    other_seed = bigbird_ja.attention_mask(tiny_config(num_random_blocks=2, random_seed=1), 400, 0)
    assert not torch.equal(masks[0], other_seed)


def test_layout_touches_no_global_random_generator():
    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    bigbird_ja.attention_mask(tiny_config(random_seed=99), 333, 2)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2] == numpy_state[2]


def _mask_digest(seq_len: int) -> str:
    config = tiny_config(random_seed=5)
    stacked = torch.stack([bigbird_ja.attention_mask(config, seq_len, layer) for layer in range(3)])
    return hashlib.sha256(stacked.numpy().tobytes()).hexdigest()


def test_layout_is_identical_in_another_process():
    code = ("import sys; sys.path.insert(0, 'tests'); from test_layout import _mask_digest; "
            "print(_mask_digest(517))")
    import os

    env = dict(os.environ, PYTHONHASHSEED="12345")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                           cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert child.stdout.strip() == _mask_digest(517)


def test_layout_is_the_same_in_training_and_evaluation():
    config = tiny_config()
    model = bigbird_ja.BigBirdJaModel(config)
    ids = torch.randint(1, config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        eval_out = model(ids).last_hidden_state
    model.train()  # dropout is 0 in tiny_config, so only the layout could change the output
    with torch.no_grad():
        train_out = model(ids).last_hidden_state
    assert torch.equal(eval_out, train_out)
    # and a short batch first does not switch anything for the next long one
    with torch.no_grad():
        model(ids[:, :5])
        again = model(ids).last_hidden_state
    assert torch.equal(again, train_out)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("length", [37, 83, 300])
def test_a_sequence_sees_the_same_blocks_alone_and_padded_to_any_longer_length(length, block_size):
    """What makes outputs batch-invariant: padding a sequence (because a longer one shares its batch) changes no
    block pair among its own tokens, random blocks included."""
    config = tiny_config(block_size=block_size, num_random_blocks=3)
    for layer in range(config.num_hidden_layers):
        alone = bigbird_ja.attention_mask(config, length, layer)
        for padded in (length + 1, length + block_size, 2 * length + 7, config.max_position_embeddings):
            inside = bigbird_ja.attention_mask(config, padded, layer)[:, :length, :length]
            assert torch.equal(inside, alone), f"layer {layer}, padded to {padded}: {int((inside != alone).sum())} " \
                                               f"token pairs differ"


def test_the_layout_beyond_max_position_embeddings_is_defined_and_invariant():
    """Longer inputs (a relative-only model read past its length) keep the same rule: random blocks come from the
    draw over the first max_position_embeddings tokens, so a row past them still has its random blocks, all there."""
    config = tiny_config(block_size=16, max_position_embeddings=256, num_random_blocks=3)
    horizon, g, half = 256 // 16, config.num_global_blocks, config.num_window_blocks // 2
    for layer in range(config.num_hidden_layers):
        beyond = bigbird_ja.attention_mask(config, 3 * 256 + 5, layer)
        for shorter in (256, 2 * 256 + 3):
            assert torch.equal(bigbird_ja.attention_mask(config, shorter, layer), beyond[:, :shorter, :shorter])
        blocks = blocks_of(beyond, 16)  # [H, nb, nb]
        for q in range(horizon + half, blocks.shape[1]):  # rows whose window lies wholly past the horizon
            assert (blocks[:, q, g:horizon].sum(-1) == 3).all(), q  # all 3 random blocks, inside the horizon
            assert not blocks[:, q, horizon:q - half].any(), q


def test_layouts_that_cover_every_block_are_exactly_dense():
    config = tiny_config(num_window_blocks=3, num_global_blocks=1, num_random_blocks=2)
    # up to 3 blocks, the global block and the windows cover every row, whatever the random blocks
    for seq_len in (1, 8, 17, 3 * config.block_size):
        assert bool(bigbird_ja.attention_mask(config, seq_len, 0).all()), seq_len
    assert not bool(bigbird_ja.attention_mask(config, 20 * config.block_size, 0).all())


def test_full_attention_type_attends_everything():
    mask = bigbird_ja.attention_mask(tiny_config(attention_type="full"), 300, 1)
    assert bool(mask.all())


def test_attention_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layer_idx"):
        bigbird_ja.attention_mask(tiny_config(), 10, layer_idx=3)
    with pytest.raises(ValueError, match="seq_len"):
        bigbird_ja.attention_mask(tiny_config(), 0)
