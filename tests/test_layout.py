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


# ----------------------------------------------------------------------------------------------------------------
# `bigbird-ja layout` at lengths the model cannot take or no drawing can show (issue 25, case 9)


def _layout(capsys, tmp_path, *args: str) -> tuple[int, str]:
    from bigbird_ja.cli import main

    code = main(["layout", "--out", str(tmp_path / "layout.png"), *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("seq_len", [4097, 10_000_000])
def test_layout_beyond_the_models_length_is_refused_naming_the_limit_and_the_fix(capsys, tmp_path, seq_len):
    """Case 9: the command raised max_position_embeddings to the length and built the layout: 10M tokens tried to
    allocate ~195 GB."""
    code, err = _layout(capsys, tmp_path, "--seq-len", str(seq_len))
    assert code == 2 and f"--seq-len {seq_len}" in err and "max_position_embeddings=4096" in err, err
    assert f"--max-length {seq_len}" in err and not (tmp_path / "layout.png").exists(), err


@pytest.mark.parametrize("attention_type", ["block_sparse", "full"])
def test_a_longer_model_is_drawn_up_to_the_blocks_a_picture_can_show(capsys, tmp_path, attention_type):
    """--max-length lays a longer maximum over the config (the fix the refusal names); past 1,024 blocks a side (more
    cells than pixels, and memory that grows with their square) the drawing is refused, naming the limit."""
    code, err = _layout(capsys, tmp_path, "--max-length", "8192", "--seq-len", "8000", "--num-heads", "4",
                        "--attention-type", attention_type)
    assert code == 0 and (tmp_path / "layout.png").read_bytes()[:4] == b"\x89PNG", err
    code, err = _layout(capsys, tmp_path, "--max-length", "10000000", "--seq-len", "10000000",
                        "--attention-type", attention_type)
    assert code == 2 and "--seq-len 10000000" in err and "1,024 blocks" in err and "65,536 tokens" in err, err


@pytest.mark.parametrize("option,value,named", [("--seq-len", "0", "--seq-len"), ("--seq-len", "-5", "--seq-len"),
                                                ("--num-heads", "5", "--num-heads"),
                                                ("--block-size", "3", "--block-size"),
                                                ("--layer", "99", "--layer"), ("--head", "-1", "--head")])
def test_layout_options_out_of_range_are_refused_naming_the_option(capsys, tmp_path, option, value, named):
    code, err = _layout(capsys, tmp_path, "--seq-len", "512", f"{option}={value}")
    assert code == 2 and named in err, err


def test_a_random_draw_beyond_the_memory_limit_is_refused_naming_random_block_span():
    """The random blocks are drawn from hash keys of every (head, query block, candidate block): quadratic in the
    blocks. A length whose draw needs more than the limit is refused before anything is allocated."""
    from bigbird_ja.attention.layout import MAX_RANDOM_DRAW_ELEMENTS, SparsitySpec, build_layout

    spec = SparsitySpec("block_sparse", 64, 3, 2, 3, 0, 12, horizon_blocks=1_000_000)
    with pytest.raises(ValueError, match=r"more than the limit of .*random_block_span"):
        build_layout(spec, 0, 4096)
    assert 12 * 4094 * 1_000_000 > MAX_RANDOM_DRAW_ELEMENTS
    small = SparsitySpec("block_sparse", 64, 3, 2, 3, 0, 12, horizon_blocks=64)
    assert build_layout(small, 0, 64).key_blocks.shape == (12, 62, 8)


@pytest.mark.parametrize("max_length", [10 ** 12, 3 * 10 ** 311], ids=["1e12", "3e311"])
def test_a_model_too_long_to_draw_random_blocks_for_is_refused_naming_the_option(capsys, tmp_path, max_length):
    """Found by the layout properties: --max-length 3e311 raised OverflowError (the layout's refusal counted GiB in
    a float) and the refusal of --max-length 1e12 named the config's fields but not the option that set them."""
    from bigbird_ja.attention.layout import SparsitySpec, build_layout

    code, err = _layout(capsys, tmp_path, "--config", "configs/model/tiny-cpu.yaml", "--seq-len", "512",
                        f"--max-length={max_length}")
    assert code == 2 and "--max-length" in err and f"drawn over {-(-max_length // 32):,}" in err, err
    with pytest.raises(ValueError, match="random_block_span"):  # the layout's own refusal, for any caller
        build_layout(SparsitySpec("block_sparse", 32, 3, 2, 2, 0, 4, horizon_blocks=-(-max_length // 32)), 0, 16)


def test_full_attention_ignores_absurd_sparse_settings():
    """Found by the layout properties: with attention_type='full' the window and random settings are unused (and
    unchecked), but the empty slot list was sized by them: 2**62 random blocks raised TypeError / "Stride calculation
    overflowed" in the layout and in the model's forward."""
    from bigbird_ja import BigBirdJaModel

    config = tiny_config(attention_type="full", num_random_blocks=2 ** 62, num_window_blocks=2 ** 61 + 1)
    assert bool(bigbird_ja.attention_mask(config, 40, 0).all())
    hidden = BigBirdJaModel(config)(torch.randint(5, 100, (1, 40))).last_hidden_state
    assert hidden.shape == (1, 40, config.hidden_size) and bool(hidden.isfinite().all())


def test_the_drawing_of_full_attention_ignores_absurd_window_settings(capsys, tmp_path):
    """Found by the layout properties: --attention-type full --num-window-blocks 100000000000000000001 raised
    OverflowError where the drawing coloured the window cells (full attention has none: every cell is global)."""
    from bigbird_ja.plotting import block_categories

    config = tiny_config(attention_type="full", num_window_blocks=10 ** 20 + 1)
    assert bool((block_categories(config, 100, 0) == 1).all())  # every cell global
    code, err = _layout(capsys, tmp_path, "--config", "configs/model/tiny-cpu.yaml", "--attention-type", "full",
                        "--num-window-blocks", str(10 ** 20 + 1), "--seq-len", "256", "--head", "0")
    assert code == 0 and (tmp_path / "layout.png").is_file(), err


def test_a_layout_too_big_to_draw_is_refused_before_it_is_built(capsys, tmp_path):
    """Within the model's length, many heads over many small blocks still made a layout of gigabytes for one picture
    (32 heads x 1,024 blocks of 1 token: ~1.3 GB, 128 heads: ~5 GB): refused naming the options that shrink it."""
    tiny = "configs/model/tiny-cpu.yaml"
    code, err = _layout(capsys, tmp_path, "--config", tiny, "--seq-len", "1024", "--block-size", "1", "--num-heads",
                        "32", "--head", "0")
    assert code == 2 and "16,777,216 cells" in err and "--num-heads" in err and "--block-size" in err, err
    code, err = _layout(capsys, tmp_path, "--config", tiny, "--seq-len", "64", "--num-heads", "128")
    assert code == 2 and "128 heads" in err and "--head" in err, err
    code, err = _layout(capsys, tmp_path, "--config", tiny, "--seq-len", "64", "--num-heads", "128", "--head", "127")
    assert code == 0, err
