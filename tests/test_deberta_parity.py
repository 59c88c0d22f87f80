"""Checkpoints converted from random transformers DeBERTa-v2 models compute what transformers computes."""

import pytest
import torch
from transformers import DebertaV2ForMaskedLM, DebertaV2ForQuestionAnswering, DebertaV2Model

import bigbird_ja
from bigbird_ja.convert import convert_checkpoint
from conftest import deberta_config, random_batch, randomize_

VARIANTS = {
    "v3-like": dict(),
    "separate-position-projections": dict(share_att_key=False, norm_rel_ebd="none"),
    "c2p-only-no-buckets": dict(pos_att_type="c2p", position_buckets=-1, max_relative_positions=64),
    "v2-absolute-conv-token-types": dict(position_biased_input=True, conv_kernel_size=3, type_vocab_size=2,
                                         pos_att_type="p2c"),
}


def convert_and_load(tmp_path, source, auto_class, **convert_args):
    source.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", **convert_args)
    return auto_class.from_pretrained(tmp_path / "dst").eval()


def assert_close_on_tokens(ours, theirs, mask, atol=1e-5):
    valid = mask.bool()
    error = (ours[valid] - theirs[valid]).abs().max().item()
    print(f"max |ours - transformers| over real tokens = {error:.2e}")
    assert error < atol


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_attention_matches_transformers_deberta_v2(tmp_path, variant):
    from transformers import AutoModel

    source = randomize_(DebertaV2Model(deberta_config(**VARIANTS[variant])), seed=1).eval()
    ours = convert_and_load(tmp_path, source, AutoModel, attention_type="full")
    assert isinstance(ours, bigbird_ja.BigBirdJaModel)
    ids, mask = random_batch(3, 77, 101, seed=2)
    token_types = (torch.arange(77) > 30).long().expand(3, 77) if VARIANTS[variant].get("type_vocab_size") else None
    with torch.no_grad():
        theirs = source(ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state
        mine = ours(ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state
    assert_close_on_tokens(mine, theirs, mask)


@pytest.mark.parametrize("legacy", [True, False])
def test_masked_lm_logits_match(tmp_path, legacy):
    from transformers import AutoModelForMaskedLM

    source = randomize_(DebertaV2ForMaskedLM(deberta_config(legacy=legacy)), seed=3).eval()
    ours = convert_and_load(tmp_path, source, AutoModelForMaskedLM, attention_type="full")
    assert isinstance(ours, bigbird_ja.BigBirdJaForMaskedLM)
    ids, mask = random_batch(2, 50, 101, seed=4)
    with torch.no_grad():
        assert_close_on_tokens(ours(ids, attention_mask=mask).logits, source(ids, attention_mask=mask).logits, mask)


def test_question_answering_logits_match(tmp_path):
    from transformers import AutoModelForQuestionAnswering

    source = randomize_(DebertaV2ForQuestionAnswering(deberta_config()), seed=5).eval()
    ours = convert_and_load(tmp_path, source, AutoModelForQuestionAnswering, attention_type="full")
    ids, mask = random_batch(3, 61, 101, seed=6)
    with torch.no_grad():
        theirs, mine = source(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    assert_close_on_tokens(mine.start_logits, theirs.start_logits, mask)
    assert_close_on_tokens(mine.end_logits, theirs.end_logits, mask)


def transformers_with_layout(source: DebertaV2Model, config, ids, mask):
    """transformers' own DeBERTa-v2 layers, each given a 4-D mask built from our layout and the padding."""
    valid = mask.bool()
    hidden = source.embeddings(input_ids=ids, mask=mask)
    rel_embeddings = source.encoder.get_rel_embedding()
    relative_pos = source.encoder.get_rel_pos(hidden)
    for i, layer in enumerate(source.encoder.layer):
        layout = bigbird_ja.attention_mask(config, ids.shape[1], i)  # [H, N, N]
        mask4d = layout[None] & valid[:, None, None, :] & valid[:, None, :, None]
        hidden, _ = layer(hidden, mask4d, relative_pos=relative_pos, rel_embeddings=rel_embeddings)
    return hidden


SPARSITY = [
    dict(block_size=64, num_window_blocks=3, num_global_blocks=2, num_random_blocks=3),
    dict(block_size=16, num_window_blocks=3, num_global_blocks=1, num_random_blocks=2),
    dict(block_size=32, num_window_blocks=5, num_global_blocks=0, num_random_blocks=1),
]


@pytest.mark.parametrize("length", [1, 63, 64, 65, 200, 1000])
@pytest.mark.parametrize("sparsity", range(len(SPARSITY)))
def test_block_sparse_matches_transformers_with_the_layout_as_4d_mask(tmp_path, length, sparsity):
    from transformers import AutoModel

    source = randomize_(DebertaV2Model(deberta_config(max_position_embeddings=1024)), seed=7).eval()
    ours = convert_and_load(tmp_path, source, AutoModel, attention_type="block_sparse", **SPARSITY[sparsity])
    ids, mask = random_batch(2, length, 101, seed=length)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).last_hidden_state
        theirs = transformers_with_layout(source, ours.config, ids, mask)
        dense = source(ids, attention_mask=mask).last_hidden_state
    assert_close_on_tokens(mine, theirs, mask)
    if not bool(bigbird_ja.attention_mask(ours.config, length, 0).all()):
        # a real sparse layout computes something else than dense attention
        assert (mine - dense)[mask.bool()].abs().max() > 1e-3
