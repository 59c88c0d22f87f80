"""Warm start from BigBird and the conversion's reporting, atomic writing and tokenizer carrying."""

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, BigBirdConfig, BigBirdForMaskedLM, BigBirdModel

import bigbird_ja
from bigbird_ja.cli import main as cli_main
from bigbird_ja.convert import ConversionError, convert_checkpoint
from conftest import deberta_config, random_batch, randomize_, tiny_config


def bigbird_config(**overrides):
    values = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=256, attention_type="original_full", block_size=16, num_random_blocks=2,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=2)
    values.update(overrides)
    return BigBirdConfig(**values)


def test_bigbird_base_model_matches_transformers_original_full(tmp_path):
    source = randomize_(BigBirdModel(bigbird_config(), add_pooling_layer=False), seed=1).eval()
    source.save_pretrained(tmp_path / "src")
    report = convert_checkpoint(tmp_path / "src", tmp_path / "dst", attention_type="full")
    assert report.missing == [] and report.unused == []
    ours = AutoModel.from_pretrained(tmp_path / "dst").eval()
    assert not ours.config.relative_attention and ours.config.position_biased_input
    ids, mask = random_batch(3, 83, 101, seed=2)
    token_types = (torch.arange(83) >= 40).long().expand(3, 83)
    with torch.no_grad():
        theirs = source(ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state
        mine = ours(ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state
    error = (mine - theirs)[mask.bool()].abs().max().item()
    print(f"max |ours - transformers BigBird| = {error:.2e}")
    assert error < 1e-5


def test_bigbird_masked_lm_logits_match(tmp_path):
    source = randomize_(BigBirdForMaskedLM(bigbird_config()), seed=3).eval()
    source.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", attention_type="full")
    ours = AutoModelForMaskedLM.from_pretrained(tmp_path / "dst").eval()
    ids, mask = random_batch(2, 40, 101, seed=4)
    with torch.no_grad():
        theirs, mine = source(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    assert (mine - theirs)[mask.bool()].abs().max().item() < 1e-5


def test_bigbird_sparsity_settings_carry_over(tmp_path):
    BigBirdModel(bigbird_config(attention_type="block_sparse"), add_pooling_layer=False).save_pretrained(tmp_path / "s")
    convert_checkpoint(tmp_path / "s", tmp_path / "d")
    config = bigbird_ja.BigBirdJaConfig.from_pretrained(tmp_path / "d")
    assert (config.attention_type, config.block_size, config.num_random_blocks) == ("block_sparse", 16, 2)


def test_unknown_source_weights_are_reported_by_name_and_stop_the_conversion(tmp_path):
    from safetensors.torch import load_file, save_file

    BigBirdModel(bigbird_config()).save_pretrained(tmp_path / "src")
    weights = load_file(tmp_path / "src" / "model.safetensors")
    weights["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    save_file(weights, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"attention\.self\.rotary\.weight.*allow-unused"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary folder left behind
    report = convert_checkpoint(tmp_path / "src", tmp_path / "dst", allow_unused=True)
    assert report.unused == ["encoder.layer.0.attention.self.rotary.weight"]
    # the pooler has no home in BigBirdJaModel: reported as dropped, by name
    assert sorted(report.dropped) == ["pooler.bias", "pooler.weight"]
    saved = json.loads((tmp_path / "dst" / "conversion_report.json").read_text())
    assert saved["unused"] == report.unused and saved["dropped"] == report.dropped


def test_missing_weights_are_reported_by_name(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import DebertaV2Model

    DebertaV2Model(deberta_config()).save_pretrained(tmp_path / "src")
    weights = load_file(tmp_path / "src" / "model.safetensors")
    del weights["encoder.layer.1.attention.self.value_proj.weight"]
    save_file(weights, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"encoder\.layer\.1\.attention\.self\.value_proj\.weight"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    report = convert_checkpoint(tmp_path / "src", tmp_path / "dst", allow_missing=True)
    assert report.missing == ["encoder.layer.1.attention.self.value_proj.weight"]


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ConversionError, match="config.json"):
        convert_checkpoint(tmp_path / "nothing", tmp_path / "dst")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="deberta-v2.*big_bird"):
        convert_checkpoint(tmp_path / "bert", tmp_path / "dst")
    BigBirdModel(bigbird_config(), add_pooling_layer=False).save_pretrained(tmp_path / "bb")
    with pytest.raises(ConversionError, match="absolute position embeddings"):
        convert_checkpoint(tmp_path / "bb", tmp_path / "dst", max_length=512)
    (tmp_path / "bb" / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no weights"):
        convert_checkpoint(tmp_path / "bb", tmp_path / "dst")


def _save_tiny_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "東京", "は", "日本"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)


def test_cli_convert_carries_the_tokenizer_and_extends_the_length(tmp_path, capsys):
    from transformers import AutoTokenizer, DebertaV2ForMaskedLM

    DebertaV2ForMaskedLM(deberta_config()).save_pretrained(tmp_path / "src")
    _save_tiny_tokenizer(tmp_path / "src")
    code = cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--max-length", "2048",
                     "--block-size", "32"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "BigBirdJaForMaskedLM" in printed and "0 missing, 0 unused" in printed
    config = bigbird_ja.BigBirdJaConfig.from_pretrained(tmp_path / "dst")
    assert (config.max_position_embeddings, config.block_size, config.max_relative_positions) == (2048, 32, 128)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "dst")
    assert tokenizer("東京 は 日本")["input_ids"] == [5, 6, 7]
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "dst")
    assert model(torch.randint(5, 101, (1, 1500))).logits.shape == (1, 1500, 101)
    # an existing destination is refused, not overwritten
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_layout_draws_a_png(tmp_path):
    out = tmp_path / "layout.png"
    assert cli_main(["layout", "--seq-len", "1000", "--num-heads", "4", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["layout", "--seq-len", "1000", "--head", "9", "--num-heads", "4", "--out", str(out)]) == 2
    assert cli_main(["layout", "--seq-len", "512", "--num-window-blocks", "4", "--out", str(out)]) == 2
    preset = __import__("pathlib").Path(__file__).parents[1] / "configs" / "model" / "tiny-cpu.yaml"
    assert cli_main(["layout", "--config", str(preset), "--seq-len", "1024", "--out", str(out)]) == 0


# ----------------------------------------------------------------------------------------------------------------
# Issue 25: every consumer of a model folder verifies it; NaN is never a sound weight


def _damage(path, count=64):
    """Invert ``count`` bytes in the middle of a file: bit flips that keep its size."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_convert_writes_checksums_last_and_from_pretrained_refuses_a_damaged_output(tmp_path):
    from bigbird_ja.common.checksums import LISTING, DamagedFolderError, files_under, verify_listing

    BigBirdForMaskedLM(bigbird_config()).save_pretrained(tmp_path / "src")
    _save_tiny_tokenizer(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", attention_type="full")
    listed = json.loads((tmp_path / "dst" / LISTING).read_text())["files"]
    assert sorted(listed) == files_under(tmp_path / "dst", exclude=(LISTING,))  # everything, the report included
    assert {"model.safetensors", "config.json", "tokenizer.json", "conversion_report.json"} <= set(listed)
    assert verify_listing(tmp_path / "dst") == []
    AutoModelForMaskedLM.from_pretrained(tmp_path / "dst")  # intact: loads

    _damage(tmp_path / "dst" / "model.safetensors")
    for load in (AutoModelForMaskedLM.from_pretrained, bigbird_ja.BigBirdJaForMaskedLM.from_pretrained):
        with pytest.raises(DamagedFolderError, match=r"dst is damaged: model.safetensors has sha256 .*checksums.json"):
            load(tmp_path / "dst")
    # the opt-out, for a caller that has just verified the folder itself
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "dst", verify_checksums=False) is not None


def test_from_pretrained_checks_a_subfolder_and_leaves_folders_without_a_listing_alone(tmp_path):
    from bigbird_ja.common.checksums import DamagedFolderError, write_listing

    model = randomize_(bigbird_ja.BigBirdJaModel(tiny_config()), seed=5)
    model.save_pretrained(tmp_path / "run" / "model")  # save_pretrained writes no listing: loads as before
    again = AutoModel.from_pretrained(tmp_path / "run" / "model")
    torch.testing.assert_close(again.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)
    write_listing(tmp_path / "run" / "model")
    with open(tmp_path / "run" / "model" / "model.safetensors", "ab") as weights:  # changed after the listing
        weights.write(bytes(8))
    with pytest.raises(DamagedFolderError, match=r"model.safetensors has \d+ bytes, checksums.json says"):
        AutoModel.from_pretrained(tmp_path / "run", subfolder="model")


def test_non_finite_source_weights_stop_the_conversion_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    BigBirdModel(bigbird_config(), add_pooling_layer=False).save_pretrained(tmp_path / "src")
    weights = load_file(tmp_path / "src" / "model.safetensors")
    weights["encoder.layer.1.output.dense.weight"][2, 3] = float("nan")
    weights["embeddings.word_embeddings.weight"][0, 0] = float("inf")
    save_file(weights, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"2 source tensors hold NaN or inf: embeddings\.word_embeddings\.weight"
                                              r", encoder\.layer\.1\.output\.dense\.weight"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
