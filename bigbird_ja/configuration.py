"""`BigBirdJaConfig`: DeBERTa-v2 fields plus the BigBird block-sparse layout.

Every field that DeBERTa-v2 has keeps its name and meaning, so a DeBERTa-v2/v3 `config.json` maps onto this class
without renaming; the sparsity fields are added beside them. Validation lives here, in one place: an invalid
combination raises a `ValueError` naming the field, the rule and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from transformers import PreTrainedConfig

ATTENTION_TYPES = ("block_sparse", "full")
ATTENTION_BACKENDS = ("auto", "reference", "blocked", "triton", "flex")
POS_ATT_TYPES = ("c2p", "p2c")


class BigBirdJaConfig(PreTrainedConfig):
    r"""Configuration of a BigBird-ja encoder. Defaults describe a 4,096-token base model.

    DeBERTa-v2 fields (same names and meanings as `transformers.DebertaV2Config`):
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act,
        hidden_dropout_prob, attention_probs_dropout_prob, max_position_embeddings, type_vocab_size,
        initializer_range, layer_norm_eps, relative_attention, max_relative_positions (-1: use
        max_position_embeddings), position_buckets (-1: no log buckets), pos_att_type (a list or "p2c|c2p"),
        share_att_key, norm_rel_ebd ("layer_norm" or "none"), position_biased_input (add absolute position
        embeddings), embedding_size (None: hidden_size), pooler_hidden_size, pooler_dropout, pooler_hidden_act,
        conv_kernel_size / conv_groups / conv_act (DeBERTa-v2's optional convolution after layer 0; 0 disables).

    The default relative-position settings (256 log buckets over 4,096 positions) keep distinct buckets across the
    whole 4,096-token span; DeBERTa-v3's usual 256 buckets over 512 positions saturate beyond about 512 tokens.

    Sparsity fields:
        attention_type: "block_sparse" (BigBird layout) or "full" (dense, exactly DeBERTa-v2).
        block_size: tokens per block, a power of two.
        num_window_blocks: odd number of neighbouring blocks each query block sees (itself in the middle).
        num_global_blocks: the first blocks of the sequence; they attend to every block and every block attends to
            them, so a question placed first is global.
        num_random_blocks: extra key blocks per query block, drawn per layer and head from
            (random_seed, layer, head, number of blocks), never from the window or the global blocks.
        random_seed: seed of the random blocks.
        random_block_span: positions over which each query block's random blocks are drawn (None: the model's
            max_position_embeddings). An input keeps the drawn blocks that fall inside it, so a sequence sees the same
            blocks whatever its batch is padded to.
        attention_backend: "auto" (triton on CUDA when available, otherwise blocked), "reference" (dense O(n^2),
            the truth for tests), "blocked" (pure PyTorch, memory linear in length), "triton" or "flex" (torch's
            FlexAttention; compiled on GPUs, forward only on CPU; no attention dropout).

    Length and function. Two quantities that define what a model computes follow max_position_embeddings when left
    unset: the relative-position range (max_relative_positions < 1) and the span the random blocks are drawn over
    (random_block_span None). A saved config.json therefore holds them resolved (`to_dict`), so raising the length
    of a saved model (`from_pretrained(folder, max_position_embeddings=n)`, `model.extend_length(n)`, `bigbird-ja
    convert SRC DST --max-length n`, `model.overrides.max_position_embeddings`) keeps its outputs on every input it
    already handled; longer distances share the last relative bucket and longer inputs see random blocks drawn over
    the span it knew. `LENGTH_DEFINED_FIELDS` names them.
    """

    model_type = "bigbird-ja"

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 4096
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = True
    max_relative_positions: int = -1
    position_buckets: int = 256
    pos_att_type: str | list[str] | None = None
    share_att_key: bool = True
    norm_rel_ebd: str = "layer_norm"
    position_biased_input: bool = False
    embedding_size: int | None = None
    pooler_hidden_size: int | None = None
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = True

    attention_type: str = "block_sparse"
    block_size: int = 64
    num_window_blocks: int = 3
    num_global_blocks: int = 2
    num_random_blocks: int = 3
    random_seed: int = 0
    random_block_span: int | None = None
    attention_backend: str = "auto"

    def __post_init__(self, **kwargs):
        if self.pos_att_type is None:
            self.pos_att_type = ["p2c", "c2p"]
        elif isinstance(self.pos_att_type, str):
            self.pos_att_type = [x.strip() for x in self.pos_att_type.lower().split("|") if x.strip()]
        else:
            self.pos_att_type = list(self.pos_att_type)
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        if self.pooler_hidden_size is None:
            self.pooler_hidden_size = self.hidden_size
        super().__post_init__(**kwargs)
        self.validate_bigbird_ja()

    # What a saved folder carries beside config.json, written by hooks called as hook(config, folder) before
    # config.json (so they may set fields of it, as auto_map). `import bigbird_ja` adds the remote-code writer
    # (`bigbird_ja.hub.register_remote_code`), which lives above the model and is therefore not imported here. In a
    # saved folder's copy of this class the list stays empty: transformers' `custom_object_save` copies the code.
    save_hooks = []

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """transformers' `save_pretrained` after the `save_hooks`; with bigbird_ja imported, the folder loads where
        bigbird_ja is not installed: `AutoModel.from_pretrained(folder, trust_remote_code=True)` finds `auto_map` in
        config.json and the model's code beside it (`bigbird_ja.hub`). Every model's `save_pretrained` comes through
        here."""
        if not os.path.isfile(save_directory):  # a file: transformers' own error first
            for hook in self.save_hooks:
                hook(self, save_directory)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_dict(self) -> dict:
        """transformers' `to_dict` with the length-defined fields resolved (see the class docstring): what
        config.json, checkpoints and run files record is the function, not a rule that a new length would move."""
        return resolve_length_fields(super().to_dict())

    # --- derived quantities, one definition each -------------------------------------------------------------
    @property
    def effective_max_relative_positions(self) -> int:
        """DeBERTa's rule: a value below 1 means max_position_embeddings."""
        if self.max_relative_positions < 1:
            return self.max_position_embeddings
        return self.max_relative_positions

    @property
    def relative_span(self) -> int:
        """Half the number of relative-embedding rows (DeBERTa's `pos_ebd_size`, its `att_span`)."""
        return self.position_buckets if self.position_buckets > 0 else self.effective_max_relative_positions

    @property
    def attention_head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_bigbird_ja(self) -> None:
        """Raise `ValueError` naming the field, the rule and the fix.

        Called at construction and once more when a model is built (`BigBirdJaModel.__init__`): transformers checks
        only its own fields on assignment, so a field set after construction is first seen there.
        """

        def fail(field: str, rule: str) -> None:
            raise ValueError(f"BigBirdJaConfig.{field}={getattr(self, field)!r}: {rule}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "max_position_embeddings"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                fail(field, "must be a positive integer.")
        if self.hidden_size % self.num_attention_heads != 0:
            fail("hidden_size", f"must be a multiple of num_attention_heads={self.num_attention_heads}.")
        for field in ("hidden_dropout_prob", "attention_probs_dropout_prob", "pooler_dropout"):
            if not 0.0 <= float(getattr(self, field)) < 1.0:
                fail(field, "must be in [0, 1).")
        bad = [p for p in self.pos_att_type if p not in POS_ATT_TYPES]
        if bad:
            fail("pos_att_type", f"unknown entries {bad}; allowed are {list(POS_ATT_TYPES)} (or 'p2c|c2p').")
        if self.relative_attention and self.position_buckets > 0 and self.effective_max_relative_positions <= self.position_buckets // 2 + 1:
            fail("position_buckets", f"log buckets need max_relative_positions (effective "
                 f"{self.effective_max_relative_positions}) above position_buckets/2 + 1; raise max_relative_positions.")
        if self.attention_type not in ATTENTION_TYPES:
            fail("attention_type", f"must be one of {ATTENTION_TYPES}.")
        if self.attention_backend not in ATTENTION_BACKENDS:
            fail("attention_backend", f"must be one of {ATTENTION_BACKENDS}.")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 1 or bs & (bs - 1):
            fail("block_size", "must be a power of two (e.g. 32, 64 or 128); the kernels tile by it.")
        w = self.num_window_blocks
        if not isinstance(w, int) or w < 1 or w % 2 == 0:
            fail("num_window_blocks", "must be a positive odd number: the window is centred on the query block.")
        if self.random_block_span is not None and (not isinstance(self.random_block_span, int)
                                                   or self.random_block_span < 1):
            fail("random_block_span", "must be a positive number of positions, or None for max_position_embeddings.")
        for field in ("num_global_blocks", "num_random_blocks", "random_seed"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 0:
                fail(field, "must be a non-negative integer.")
        span = min(self.max_position_embeddings, self.random_block_span or self.max_position_embeddings)
        blocks_in_span = -(-span // bs)
        used = w + self.num_global_blocks + self.num_random_blocks
        if self.attention_type == "block_sparse" and used > blocks_in_span:
            fail("num_random_blocks", f"window ({w}) + global ({self.num_global_blocks}) + random "
                 f"({self.num_random_blocks}) blocks = {used}, but a {span}-token sequence (max_position_embeddings="
                 f"{self.max_position_embeddings}, random_block_span={self.random_block_span}) has only "
                 f"{blocks_in_span} blocks of {bs}; use fewer random blocks or attention_type='full'.")


# Fields whose unset value follows max_position_embeddings; they decide the model's function, not its shapes (with
# log buckets; without them max_relative_positions sizes the relative embeddings too).
LENGTH_DEFINED_FIELDS = ("max_relative_positions", "random_block_span")


def resolve_length_fields(values: dict) -> dict:
    """``values`` (a config dict) with the `LENGTH_DEFINED_FIELDS` that follow its max_position_embeddings set to
    it; values already set stay. max_relative_positions is left alone without relative attention (nothing reads
    it then)."""
    values = dict(values)
    length = values.get("max_position_embeddings") or BigBirdJaConfig.max_position_embeddings
    if values.get("relative_attention", True) and (values.get("max_relative_positions") or -1) < 1:
        values["max_relative_positions"] = length
    if values.get("random_block_span") is None:
        values["random_block_span"] = length
    return values


def lengthen_values(saved: dict, overrides: dict, *, where: str = "the saved model") -> dict:
    """Overrides for a saved config (``saved``: its config.json) that raise or lower its max_position_embeddings
    without changing its function: the `LENGTH_DEFINED_FIELDS` the saved config leaves to its length are pinned to
    that length, unless ``overrides`` name them (then the caller asked for another function). Absolute position
    embeddings (position_biased_input) cannot grow without training: refused, naming the fix."""
    new = overrides.get("max_position_embeddings")
    old = saved.get("max_position_embeddings", BigBirdJaConfig.max_position_embeddings)
    if new is None or new == old:
        return dict(overrides)
    if saved.get("position_biased_input") and new > old:
        raise ValueError(f"max_position_embeddings={new}: {where} adds absolute position embeddings ({old} of them), "
                         f"which cannot be made longer without training; keep inputs at <= {old} tokens (long "
                         f"documents are windowed)")
    pinned = resolve_length_fields(saved)
    return {**{k: pinned[k] for k in LENGTH_DEFINED_FIELDS if k not in overrides and k in pinned}, **overrides}


# Keys a preset or overrides may set beside the dataclass fields: transformers' head settings (PreTrainedConfig
# attributes) and DeBERTa's classifier dropout, which the heads read.
HEAD_KEYS = ("num_labels", "id2label", "label2id", "problem_type", "cls_dropout")


def build_model_config(source=None, overrides: dict | None = None, *, what: str = "model.overrides") -> BigBirdJaConfig:
    """The one way a `BigBirdJaConfig` is made from a preset plus overrides (CLI, pretraining, fine-tuning).

    source: None (the class defaults: the 4,096-token base model), a model preset (YAML, as under configs/model/,
        read strictly with the project's YAML dialect: an unknown key is an error listing the valid ones), a
        ``config.json`` file or a folder holding one (a save_pretrained checkpoint).
    overrides: field -> value, laid over the source before the config is built, so derived fields
        (embedding_size, pooler_hidden_size) follow an overridden hidden_size and validation sees the final values.
    what: how the overrides are named in errors (e.g. "model.overrides", "--block-size ...").
    """
    import json

    from .common.config_io import ConfigError, load_yaml_text

    valid = sorted({f.name for f in dataclasses.fields(BigBirdJaConfig)} | set(HEAD_KEYS))
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(f"{what}: unknown keys {unknown}; valid keys are {valid}")
    if source is None:
        return BigBirdJaConfig(**overrides)
    path = Path(source)
    if path.is_dir() or path.suffix == ".json":
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"model config {str(file)!r} does not exist (give a save_pretrained folder, its "
                                    f"config.json, or a model preset from configs/model/)")
        values = json.loads(file.read_text(encoding="utf-8"))
        # a saved config defines a function: a new length keeps it (lengthen_values pins what would follow it)
        overrides = lengthen_values(values, overrides, where=str(file.parent))
        return BigBirdJaConfig.from_dict({**values, **overrides})  # from_dict: transformers' own keys are fine here
    if not path.is_file():
        raise FileNotFoundError(f"model preset {str(path)!r} does not exist (presets live in configs/model/)")
    values = load_yaml_text(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of BigBirdJaConfig fields, got {type(values).__name__}")
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; valid keys are {valid}")
    return BigBirdJaConfig(**{**values, **overrides})
