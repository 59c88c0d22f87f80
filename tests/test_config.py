import json
from pathlib import Path

import pytest

import bigbird_ja
from bigbird_ja import BigBirdJaConfig


def test_defaults_describe_a_4096_token_base_model():
    config = BigBirdJaConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.max_position_embeddings == 4096
    assert config.effective_max_relative_positions == 4096  # buckets stay distinct over the whole span
    assert (config.block_size, config.num_window_blocks, config.num_global_blocks, config.num_random_blocks) == \
        (64, 3, 2, 3)
    assert config.attention_type == "block_sparse" and config.attention_backend == "auto"
    assert config.pos_att_type == ["p2c", "c2p"]


def test_relative_buckets_of_the_defaults_do_not_saturate_before_4096_tokens():
    from bigbird_ja.attention import RelativePositionSpec, relative_index_table

    def buckets_at(config, distances):
        table = relative_index_table(4096, RelativePositionSpec.from_config(config))
        return [int(table[4095 + d]) for d in distances]

    far = [512, 1024, 2048, 4095]
    default = buckets_at(BigBirdJaConfig(), far)
    assert default == sorted(set(default)), default  # strictly increasing: every distance is told apart
    v3_style = buckets_at(BigBirdJaConfig(max_relative_positions=512), far)
    assert len(set(v3_style)) == 1, v3_style  # DeBERTa-v3's usual settings saturate here


def test_deberta_v2_config_maps_without_renaming():
    from transformers import DebertaV2Config

    source = DebertaV2Config(hidden_size=64, num_attention_heads=4, relative_attention=True, position_buckets=256,
                             pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
                             max_relative_positions=-1, position_biased_input=False).to_dict()
    source.pop("model_type")
    config = BigBirdJaConfig(**source)
    for key in ("hidden_size", "num_attention_heads", "relative_attention", "position_buckets", "share_att_key",
                "norm_rel_ebd", "max_relative_positions", "position_biased_input", "layer_norm_eps"):
        assert getattr(config, key) == source[key], key
    assert config.pos_att_type == ["p2c", "c2p"]


def test_config_round_trips_through_config_json(tmp_path):
    config = BigBirdJaConfig(hidden_size=64, num_attention_heads=4, block_size=32, num_random_blocks=1,
                             attention_backend="blocked", random_seed=7)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "bigbird-ja" and saved["block_size"] == 32
    loaded = BigBirdJaConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    from transformers import AutoConfig

    assert isinstance(AutoConfig.from_pretrained(tmp_path), BigBirdJaConfig)


@pytest.mark.parametrize("field, value, words", [
    ("num_window_blocks", 4, "odd"),
    ("num_window_blocks", 0, "odd"),
    ("block_size", 48, "power of two"),
    ("block_size", 0, "power of two"),
    ("num_random_blocks", 100, "random blocks"),
    ("num_global_blocks", -1, "non-negative"),
    ("attention_type", "sliding", "attention_type"),
    ("attention_backend", "cuda", "attention_backend"),
    ("pos_att_type", "c2p|p2p", "p2p"),
    ("num_attention_heads", 5, "multiple of num_attention_heads"),
    ("attention_probs_dropout_prob", 1.5, "[0, 1)"),
])
def test_bad_config_raises_value_error_naming_the_field(field, value, words):
    with pytest.raises(ValueError) as info:
        BigBirdJaConfig(**{field: value})
    message = str(info.value)
    assert words in message
    assert field in message or field == "num_attention_heads"


def test_config_edited_after_construction_is_checked_by_the_model():
    """transformers validates only its own fields on assignment: the model checks the config it is built on."""
    from conftest import tiny_config

    config = tiny_config()
    config.num_window_blocks = 2
    with pytest.raises(ValueError, match="num_window_blocks"):
        bigbird_ja.BigBirdJaModel(config)


def test_every_model_preset_loads_strictly():
    from pathlib import Path

    from bigbird_ja.configuration import build_model_config

    presets = sorted((Path(__file__).parents[1] / "configs" / "model").glob("*.yaml"))
    assert len(presets) >= 3
    for preset in presets:
        config = build_model_config(preset)
        assert preset.read_text().startswith("#"), f"{preset.name} needs a header naming its hardware"
        assert config.max_position_embeddings >= 1024
    # the base preset spells out the class defaults: the YAML mirrors the dataclass
    assert build_model_config(presets[0].parent / "base-4096.yaml").to_dict() == BigBirdJaConfig().to_dict()


def test_model_preset_with_an_unknown_key_lists_the_valid_ones(tmp_path):
    from bigbird_ja.configuration import build_model_config

    (tmp_path / "bad.yaml").write_text("hidden_size: 64\nnum_attention_heads: 4\nblock_szie: 32\n")
    with pytest.raises(ValueError, match=r"unknown keys \['block_szie'\].*block_size"):
        build_model_config(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="configs/model"):
        build_model_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"--seq: unknown keys \['blok_size'\]"):
        build_model_config(None, {"blok_size": 32}, what="--seq")


def test_model_presets_are_read_with_the_project_yaml_dialect(tmp_path):
    """YAML 1.1 reads 1:00 as the base-60 number 60; the project's loader keeps it as text, so a typo in a preset is
    an error instead of a silently different seed (regression: the model preset loader used yaml.safe_load)."""
    from bigbird_ja.configuration import build_model_config

    (tmp_path / "seed.yaml").write_text("hidden_size: 64\nnum_attention_heads: 4\nrandom_seed: 1:00\n")
    with pytest.raises(ValueError, match="random_seed"):
        build_model_config(tmp_path / "seed.yaml")


def test_one_builder_for_presets_folders_and_overrides(tmp_path):
    """Preset, save_pretrained folder and config.json give the same config; overrides are applied before
    construction, so derived sizes follow them."""
    from bigbird_ja.configuration import build_model_config

    preset = Path(__file__).parents[1] / "configs" / "model" / "tiny-cpu.yaml"
    config = build_model_config(preset, {"random_seed": 7, "num_labels": 3})
    assert config.random_seed == 7 and config.num_labels == 3
    config.save_pretrained(str(tmp_path / "saved"))
    for source in (tmp_path / "saved", tmp_path / "saved" / "config.json"):
        assert build_model_config(source).to_dict() == config.to_dict()
    wider = build_model_config(None, {"hidden_size": 96, "num_attention_heads": 4})
    assert wider.embedding_size == wider.pooler_hidden_size == 96


# ----------------------------------------------------------------------------------------------------------------
# The run-config loader (common/config_io.py): what tests/test_cli_properties.py found


PRETRAIN_PRESET = Path(__file__).parents[1] / "configs" / "pretrain" / "tiny-cpu.yaml"


@pytest.mark.parametrize("typed,meant", [("0010", 10), ("-007", -7), ("0_100", 100), ("09", 9), ("0x1F", 31)])
def test_whole_numbers_with_leading_zeros_are_decimal_in_overrides_and_presets(tmp_path, typed, meant):
    """YAML 1.1 reads 0010 as the octal 8 (and 09 as 9): --checkpoint.every_steps=0500 would save every 320
    steps. The project's dialect reads them as YAML 1.2 does, in decimal (found by the override properties)."""
    from bigbird_ja.training.config import load_pretrain_config

    assert load_pretrain_config(PRETRAIN_PRESET, [f"--run.seed={typed}"]).run.seed == meant
    (tmp_path / "preset.yaml").write_text(f"run:\n  seed: {typed}\n")
    assert load_pretrain_config(tmp_path / "preset.yaml").run.seed == meant
    (tmp_path / "model.yaml").write_text(f"hidden_size: 64\nnum_attention_heads: 4\nrandom_seed: {typed}\n")
    if meant >= 0:
        from bigbird_ja.configuration import build_model_config

        assert build_model_config(tmp_path / "model.yaml").random_seed == meant


@pytest.mark.parametrize("override", ["--optim.lr=1" + "0" * 400, "--optim.betas=[0.9, 1" + "0" * 320 + "]",
                                      "--train.max_steps=" + "9" * 5000, "--masking.span_p=-" + "7" * 330])
def test_a_number_too_large_to_read_is_refused_naming_the_key(override):
    """An integer beyond a float's range for a float field raised OverflowError, one beyond Python's 4,300 digits
    a ValueError that named no key (found by the override properties)."""
    from bigbird_ja.common.config_io import ConfigError
    from bigbird_ja.training.config import load_pretrain_config

    key = override[2:].split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_pretrain_config(PRETRAIN_PRESET, [override])


def test_a_mapping_given_whole_replaces_the_presets_and_a_dotted_key_sets_one_entry():
    """--model.overrides={} was merged key by key into the preset's mapping, so it changed nothing (found by the
    override properties: the loaded value was not the given one); a dotted key still adds one entry."""
    from bigbird_ja.training.config import load_pretrain_config

    assert load_pretrain_config(PRETRAIN_PRESET).model.overrides == {"max_position_embeddings": 256}
    assert load_pretrain_config(PRETRAIN_PRESET, ["--model.overrides={}"]).model.overrides == {}
    whole = load_pretrain_config(PRETRAIN_PRESET, ["--model.overrides={hidden_size: 64}"]).model.overrides
    assert whole == {"hidden_size": 64}
    one = load_pretrain_config(PRETRAIN_PRESET, ["--model.overrides.hidden_size=64"]).model.overrides
    assert one == {"max_position_embeddings": 256, "hidden_size": 64}
    both = load_pretrain_config(PRETRAIN_PRESET, ["--model.overrides={}", "--model.overrides.block_size=16"])
    assert both.model.overrides == {"block_size": 16}
    assert "!!" not in both.to_yaml()  # plain mappings: the saved config.yaml reads back
