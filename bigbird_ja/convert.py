"""Warm start: turn a local DeBERTa-v2/v3 or BigBird checkpoint (transformers layout) into a bigbird_ja checkpoint,
or lengthen a bigbird_ja checkpoint (`lengthen_checkpoint`: `bigbird-ja convert FOLDER NEW_FOLDER --max-length N`).

Every source tensor is either mapped to a named parameter of the target model or reported; every target parameter
is either filled from the source or reported. Either report makes the conversion fail unless the caller allows it
(`allow_missing` / `allow_unused`), so nothing is dropped silently. A source tensor holding NaN or inf is an error
naming it (a damaged or diverged checkpoint is not a warm start). Tokenizer files are copied along. The output
folder is written to a temporary folder beside it, checksums.json last (what `from_pretrained` through the package
and every other consumer of a model folder check), and renamed into place.

Functions are kept: by default the converted model computes what the source computed (with attention_type="full");
the sparsity settings only decide which keys each query may see.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .common.checksums import LISTING, write_listing
from .configuration import BigBirdJaConfig

SOURCE_TYPES = ("deberta-v2", "big_bird")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
SKIPPED_FILES = set(WEIGHT_FILES) | {"config.json", "generation_config.json", "training_args.bin", LISTING}

# DeBERTa-v2 fields copied as they are (the config keeps their names and meanings).
DEBERTA_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "relative_attention", "max_relative_positions", "position_buckets",
    "pos_att_type", "share_att_key", "norm_rel_ebd", "position_biased_input", "embedding_size", "pooler_hidden_size",
    "pooler_dropout", "pooler_hidden_act", "conv_kernel_size", "conv_groups", "conv_act", "pad_token_id",
    "bos_token_id", "eos_token_id", "id2label", "label2id", "problem_type", "cls_dropout",
)
# DeBERTa-v2 defaults for keys a DeBERTa config.json may omit (they differ from ours).
DEBERTA_DEFAULTS = dict(relative_attention=False, max_relative_positions=-1, position_buckets=-1, pos_att_type=[],
                        share_att_key=False, norm_rel_ebd="none", position_biased_input=True, type_vocab_size=0,
                        layer_norm_eps=1e-7, conv_kernel_size=0)
BIGBIRD_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "id2label", "label2id",
    "problem_type",
)

# Source head -> target class, decided from the weight names.
HEAD_CLASSES = {
    "masked_lm": "BigBirdJaForMaskedLM",
    "question_answering": "BigBirdJaForQuestionAnswering",
    "sequence_classification": "BigBirdJaForSequenceClassification",
    "token_classification": "BigBirdJaForTokenClassification",
    "base": "BigBirdJaModel",
}


# Tensors of heads that some targets lack (a pooler, pretraining-only heads): reported as dropped, not an error.
HEAD_ONLY = re.compile(r"^(pooler\.|cls\.seq_relationship\.|mask_predictions\.)")


@dataclass
class ConversionReport:
    source_type: str
    target_class: str
    mapped: int = 0
    missing: list[str] = field(default_factory=list)  # target parameters with no source tensor
    unused: list[str] = field(default_factory=list)  # source tensors with no target parameter
    dropped: list[str] = field(default_factory=list)  # source heads the target has no place for (known names)
    tied: list[str] = field(default_factory=list)  # source tensors equal to a tied target (checked)
    copied_files: list[str] = field(default_factory=list)
    config_changes: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"converted {self.source_type} -> {self.target_class}: {self.mapped} tensors mapped, "
                 f"{len(self.tied)} tied, {len(self.dropped)} dropped, {len(self.missing)} missing, "
                 f"{len(self.unused)} unused"]
        lines += [f"  missing (freshly initialised): {name}" for name in self.missing]
        lines += [f"  unused (not carried over): {name}" for name in self.unused]
        lines += [f"  dropped (no such head in {self.target_class}): {name}" for name in self.dropped]
        lines += [f"  config: {k} = {v}" for k, v in self.config_changes.items()]
        return "\n".join(lines)


class ConversionError(ValueError):
    pass


def load_source_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a local transformers checkpoint (safetensors or .bin, sharded or not)."""
    from safetensors.torch import load_file

    if (src / "model.safetensors").is_file():
        return load_file(src / "model.safetensors")
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", lambda p: torch.load(p, weights_only=True))):
        if (src / index_name).is_file():
            shards = sorted(set(json.loads((src / index_name).read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                if not (src / shard).is_file():
                    raise ConversionError(f"{src / index_name} lists shard {shard}, which is missing from {src}.")
                state.update(loader(src / shard))
            return state
    if (src / "pytorch_model.bin").is_file():
        return torch.load(src / "pytorch_model.bin", weights_only=True)
    raise ConversionError(f"no weights in {src}: expected one of {', '.join(WEIGHT_FILES)}.")


def _target_config(source: dict, overrides: dict, report: ConversionReport) -> BigBirdJaConfig:
    kind = source.get("model_type")
    if kind == "deberta-v2":
        values = {**DEBERTA_DEFAULTS, **{k: source[k] for k in DEBERTA_FIELDS if k in source}}
        if values["max_relative_positions"] < 1:
            # Pin DeBERTa's implicit value so a longer max_position_embeddings does not re-bucket positions.
            values["max_relative_positions"] = values["max_position_embeddings"]
    elif kind == "big_bird":
        if source.get("rescale_embeddings"):
            raise ConversionError("BigBird checkpoints with rescale_embeddings=True are not supported.")
        if not source.get("use_bias", True):
            raise ConversionError("BigBird checkpoints with use_bias=False are not supported (projections need biases).")
        if source.get("position_embedding_type", "absolute") != "absolute":
            raise ConversionError("only BigBird checkpoints with absolute position embeddings are supported.")
        values = {k: source[k] for k in BIGBIRD_FIELDS if k in source}
        values.update(relative_attention=False, pos_att_type=[], position_biased_input=True,
                      pooler_hidden_act="tanh", norm_rel_ebd="none", share_att_key=False, position_buckets=-1,
                      block_size=source.get("block_size", 64), num_random_blocks=source.get("num_random_blocks", 3))
        if source.get("attention_type") == "original_full":
            values["attention_type"] = "full"
    else:
        raise ConversionError(f"model_type {kind!r} is not one of {SOURCE_TYPES}.")
    values = {k: v for k, v in values.items() if v is not None}
    max_length = overrides.pop("max_length", None)
    if max_length is not None and max_length != values["max_position_embeddings"]:
        if values.get("position_biased_input", False) and max_length > values["max_position_embeddings"]:
            raise ConversionError(
                f"--max-length {max_length} exceeds the source's {values['max_position_embeddings']} absolute "
                "position embeddings, which cannot be extended without training; keep --max-length at or below it.")
        report.config_changes["max_position_embeddings"] = max_length
        values["max_position_embeddings"] = max_length
    for key, value in overrides.items():
        if value is not None:
            report.config_changes[key] = value
            values[key] = value
    try:
        return BigBirdJaConfig(**values)
    except ValueError as err:
        raise ConversionError(f"the converted config is invalid: {err}") from err


def _rename(name: str, kind: str) -> str:
    """Source tensor name -> target name (prefix `bigbird_ja.`, DeBERTa module names)."""
    if kind == "deberta-v2":
        name = re.sub(r"^deberta\.", "bigbird_ja.", name)
        name = name.replace("lm_predictions.lm_head.dense.", "cls.predictions.transform.dense.")
        name = name.replace("lm_predictions.lm_head.LayerNorm.", "cls.predictions.transform.LayerNorm.")
        name = name.replace("lm_predictions.lm_head.bias", "cls.predictions.bias")
    else:
        name = re.sub(r"^bert\.", "bigbird_ja.", name)
        name = re.sub(r"^(bigbird_ja\.)?pooler\.(weight|bias)$", r"pooler.dense.\2", name)
        name = re.sub(r"\.attention\.self\.(query|key|value)\.", r".attention.self.\1_proj.", name)
    if name.startswith(("embeddings.", "encoder.")):  # a base model saved without its prefix
        name = "bigbird_ja." + name
    return name


def _head_of(names: list[str]) -> str:
    if any(n.startswith(("cls.predictions", "lm_predictions")) for n in names):
        return "masked_lm"
    if any(n.startswith("qa_outputs.") for n in names):
        return "question_answering"
    if any(n.startswith("classifier.") for n in names):
        if any(n.startswith("pooler.") for n in names):
            return "sequence_classification"
        return "token_classification"
    return "base"


def convert_checkpoint(src, dst, *, attention_type=None, block_size=None, max_length=None,
                       num_window_blocks=None, num_global_blocks=None, num_random_blocks=None,
                       max_relative_positions=None, allow_missing=False, allow_unused=False,
                       overwrite=False) -> ConversionReport:
    """Convert the checkpoint folder `src` into a bigbird_ja checkpoint folder `dst`; return the report."""
    from . import modeling

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} is not a transformers checkpoint folder: {src / 'config.json'} is missing.")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists; choose a new folder or pass overwrite=True (--overwrite).")
    source_config = json.loads((src / "config.json").read_text())
    kind = source_config.get("model_type")
    if kind == BigBirdJaConfig.model_type:
        changes = {k: v for k, v in dict(attention_type=attention_type, block_size=block_size,
                                         num_window_blocks=num_window_blocks, num_global_blocks=num_global_blocks,
                                         num_random_blocks=num_random_blocks,
                                         max_relative_positions=max_relative_positions).items() if v is not None}
        if changes:
            raise ConversionError(f"{src} is a bigbird-ja checkpoint: only --max-length applies to it (lengthening "
                                  f"keeps its function); {sorted(changes)} would change what it computes. Convert "
                                  f"the original DeBERTa/BigBird checkpoint with them instead")
        return lengthen_checkpoint(src, dst, max_length, overwrite=overwrite)
    if kind not in SOURCE_TYPES:
        raise ConversionError(f"model_type {kind!r} in {src / 'config.json'} is not supported: convert from "
                              "'deberta-v2' (DeBERTa-v2/v3) or 'big_bird' (BigBird ITC) checkpoints.")
    state = load_source_state_dict(src)
    # torch.equal and every later comparison would pass NaN along; a warm start from it trains nothing
    non_finite = sorted(n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if non_finite:
        raise ConversionError(f"{len(non_finite)} source tensors hold NaN or inf: {', '.join(non_finite[:20])}"
                              f"{' ...' if len(non_finite) > 20 else ''}; {src} is damaged or its training diverged. "
                              f"Copy it again from where it came from, or convert another checkpoint")
    head = _head_of([_rename(n, kind) for n in state])
    report = ConversionReport(source_type=kind, target_class=HEAD_CLASSES[head])
    overrides = dict(attention_type=attention_type, block_size=block_size, max_length=max_length,
                     num_window_blocks=num_window_blocks, num_global_blocks=num_global_blocks,
                     num_random_blocks=num_random_blocks, max_relative_positions=max_relative_positions)
    config = _target_config(source_config, overrides, report)
    if "num_labels" in source_config and source_config.get("id2label") is None:
        config.num_labels = source_config["num_labels"]
    elif head in ("sequence_classification", "token_classification"):
        config.num_labels = next(v.shape[0] for n, v in state.items() if re.search(r"classifier\.(out_proj\.)?weight$", n))
    model = getattr(modeling, report.target_class)(config)
    target = model.state_dict()
    tied_targets = set(getattr(model, "all_tied_weights_keys", {}) or {})

    new_state = {}
    for name, tensor in state.items():
        new = _rename(name, kind)
        if report.target_class == "BigBirdJaModel":
            new = new.removeprefix("bigbird_ja.")
        if new.endswith("embeddings.position_ids"):
            continue  # an index buffer, not a weight
        if new == "cls.predictions.decoder.bias" and "cls.predictions.bias" in state:
            if torch.equal(tensor, state["cls.predictions.bias"]):
                report.tied.append(name)
                continue
        if new in tied_targets:
            source_of = model.all_tied_weights_keys[new]
            source_name = next((n for n in state if _rename(n, kind) == source_of), None)
            if source_name is not None and torch.equal(tensor, state[source_name]):
                report.tied.append(name)
                continue
        if new not in target:
            (report.dropped if HEAD_ONLY.match(new) else report.unused).append(name)
            continue
        if tuple(target[new].shape) != tuple(tensor.shape):
            raise ConversionError(f"{name} -> {new}: source shape {tuple(tensor.shape)} does not match "
                                  f"target shape {tuple(target[new].shape)}.")
        new_state[new] = tensor.to(target[new].dtype)
    report.mapped = len(new_state)
    report.missing = sorted(n for n in target if n not in new_state and n not in tied_targets)
    problems = []

    def listed(names, limit=20):
        return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")

    if report.missing and not allow_missing:
        problems.append(f"{len(report.missing)} target weights have no source tensor: {listed(report.missing)} "
                        "(pass allow_missing=True / --allow-missing to initialise them freshly)")
    if report.unused and not allow_unused:
        problems.append(f"{len(report.unused)} source tensors have no target: {listed(report.unused)} "
                        "(pass allow_unused=True / --allow-unused to leave them behind)")
    if problems:
        raise ConversionError("; ".join(problems))
    model.load_state_dict(new_state, strict=False)
    model.tie_weights()

    _write_folder(model, src, dst, report)
    return report


def _write_folder(model, src: Path, dst: Path, report: ConversionReport) -> None:
    """save_pretrained into a temporary folder beside ``dst``, the source's other files (the tokenizer) copied
    along, the report, checksums.json last; then renamed into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    # mkdtemp makes the folder private (0700); the result is an ordinary folder, readable as the umask allows
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for item in sorted(src.iterdir()):
            if (item.is_file() and item.name not in SKIPPED_FILES and not item.name.endswith((".safetensors", ".bin"))
                    and not (tmp / item.name).exists()):  # save_pretrained's own files (the model's code) win
                shutil.copy2(item, tmp / item.name)
                report.copied_files.append(item.name)
        (tmp / "conversion_report.json").write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False))
        write_listing(tmp)  # last: a folder with a listing is complete
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def lengthen_checkpoint(src, dst, max_length: int, *, overwrite: bool = False) -> ConversionReport:
    """A bigbird_ja checkpoint folder ``src`` made to read ``max_length`` tokens, written to ``dst``
    (`PreTrainedModel.extend_length`): the same weights, and the same outputs on every input it already handled."""
    from . import modeling

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists; choose a new folder or pass overwrite=True (--overwrite).")
    if max_length is None:
        raise ConversionError(f"{src} is already a bigbird-ja checkpoint: give --max-length N to lengthen it (the "
                              f"only change that keeps its function)")
    config = BigBirdJaConfig.from_pretrained(src)
    name = (config.architectures or ["BigBirdJaModel"])[0]
    if not name.startswith("BigBirdJa") or not hasattr(modeling, name):
        raise ConversionError(f"{src / 'config.json'} names architecture {name!r}, which bigbird_ja does not have")
    report = ConversionReport(source_type=BigBirdJaConfig.model_type, target_class=name)
    model = getattr(modeling, name).from_pretrained(src)  # checked against its checksums.json first
    before = model.config.to_dict()
    try:
        model.extend_length(max_length)
    except ValueError as err:
        raise ConversionError(f"{src} cannot read {max_length} tokens: {err}") from None
    after = model.config.to_dict()
    report.config_changes = {k: after[k] for k in sorted(after) if before.get(k) != after[k]}
    report.mapped = len(model.state_dict())
    _write_folder(model, src, dst, report)
    return report
