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


@pytest.mark.parametrize("seq_len", [1, 7, 8, 9, 63, 64, 65, 200, 517])
@pytest.mark.parametrize("sparsity", [(3, 1, 2), (5, 2, 1), (1, 0, 3), (3, 2, 0)])
def test_attention_mask_follows_the_bigbird_rules(seq_len, sparsity):
    window, n_global, n_random = sparsity
    config = tiny_config(num_window_blocks=window, num_global_blocks=n_global, num_random_blocks=n_random)
    bs = config.block_size
    for layer in range(config.num_hidden_layers):
        mask = bigbird_ja.attention_mask(config, seq_len, layer)
        assert mask.shape == (config.num_attention_heads, seq_len, seq_len) and mask.dtype == torch.bool
        # The mask is whole blocks: every token pair of a block pair agrees.
        blocks = blocks_of(mask, bs)
        expanded = blocks.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :seq_len, :seq_len]
        assert torch.equal(mask, expanded)
        nb = blocks.shape[-1]
        g = min(n_global, nb)
        for head in range(config.num_attention_heads):
            for q in range(nb):
                seen = set(torch.nonzero(blocks[head, q]).flatten().tolist())
                if q < g:
                    assert seen == set(range(nb))
                    continue
                fixed = set(range(g)) | {b for b in range(q - window // 2, q + window // 2 + 1) if 0 <= b < nb}
                assert fixed <= seen
                randoms = seen - fixed
                assert len(randoms) == min(n_random, nb - len(fixed))


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


def test_short_sequences_are_exactly_dense():
    config = tiny_config(num_window_blocks=3, num_global_blocks=1, num_random_blocks=2)
    # 5 blocks: global 1 + window 3 (overlapping the global block in row 1) + random 2 cover every row
    mask = bigbird_ja.attention_mask(config, 5 * config.block_size - 3, 0)
    assert bool(mask.all())
    sparse_mask = bigbird_ja.attention_mask(config, 20 * config.block_size, 0)
    assert not bool(sparse_mask.all())


def test_full_attention_type_attends_everything():
    mask = bigbird_ja.attention_mask(tiny_config(attention_type="full"), 300, 1)
    assert bool(mask.all())


def test_attention_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layer_idx"):
        bigbird_ja.attention_mask(tiny_config(), 10, layer_idx=3)
    with pytest.raises(ValueError, match="seq_len"):
        bigbird_ja.attention_mask(tiny_config(), 0)
