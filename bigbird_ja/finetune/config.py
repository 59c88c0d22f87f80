"""The run configuration of `bigbird-ja finetune`: typed sections loaded strictly from YAML, with overrides.

A preset (`configs/finetune/*.yaml`) is a mapping of the sections below; each section's docstring has one entry
per field (`name: meaning`, as the pretraining sections in `bigbird_ja.training.config`), and a test checks that
every field has one and every entry names a field. Loading is strict (an unknown section or key is an error
listing the valid ones; a wrong type names the key, the expected type and the value) and `--section.key=value`
overrides (values parsed as YAML) go through the same code. The loader itself is the project's generic one
(`bigbird_ja.training.config`); this module only declares the fine-tuning sections. The resolved config is printed
at start and saved as `config.yaml` in the output folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..common.config_io import ConfigError, load_config, to_dict
from ..qa.settings import QASettings
from .registry import TASKS


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def parse_slice(text: str, where: str) -> slice:
    """A Python slice from "start:stop:step" (any part empty; a bare "N" is the first N); ConfigError otherwise."""
    parts = str(text).split(":")
    try:
        if len(parts) == 1:
            return slice(None, int(parts[0]))
        if len(parts) > 3:
            raise ValueError
        values = [int(p) if p.strip() else None for p in parts] + [None] * (3 - len(parts))
    except ValueError:
        raise ConfigError(f"{where}={text!r}: expected a slice start:stop:step of integers, e.g. '0::2' or "
                          f"'10:20'") from None
    if values[2] == 0:
        raise ConfigError(f"{where}={text!r}: the slice step must not be 0")
    return slice(*values)


@dataclass
class ModelSection:
    """The encoder to fine-tune: a checkpoint, or a preset trained from scratch.

    init_from: a save_pretrained folder (`bigbird-ja convert` / `export` output, or a fine-tuned run's model/)
        holding config.json, weights and, unless `tokenizer` is given, the tokenizer. `--model DIR` sets it. The
        task head is new unless the checkpoint has one; which weights were newly initialised is printed.
    preset: train from scratch: a model preset (configs/model/*.yaml) or a folder with config.json; random weights.
        Exactly one of init_from and preset. The vocabulary size is always the tokenizer's.
    tokenizer: tokenizer folder (null: init_from's). The long-range task builds its own and ignores this.
    overrides: BigBirdJaConfig fields laid over the model config (e.g. {attention_probs_dropout_prob: 0.0}).
    """

    init_from: str | None = None
    preset: str | None = None
    tokenizer: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """The data files and how they become model inputs.

    train, valid: data files in the task's JGLUE format (`--train-file`, `--valid-file`). The long-range task
        generates its own when they are null (see `synthetic`).
    max_train_examples, max_valid_examples: keep the first N examples (questions for QA) of each file (0: all).
    max_length: tokens per model input (QA: per window, question included; others: truncation).
    doc_stride: QA: tokens shared by consecutive windows of a long document.
    max_query_length: QA: question tokens kept (the question sits in the global blocks; 128 fills two blocks of 64).
    long_document: jsquad: join all paragraphs of an article into one document (false: the original
        paragraph-level task).
    on_mismatch: QA: an answer whose offset does not match its text stops the run ("error") or is left out of the
        training labels ("skip"); either way it is reported by id.
    windows_without_answer: QA training: a window without the answer points at [CLS] ("cls") or is dropped ("drop").
    truncate: QA: keep only the first window of each document (no sliding windows).
    train_articles, valid_articles: QA (jsquad, longrange): a slice "start:stop:step" of the file's articles to
        read (e.g. "0::2" and "1::2" split one file into disjoint training and validation articles; a bare "N" is
        the first N); null: all. Applied before max_train_examples / max_valid_examples.
    """

    train: str | None = None
    valid: str | None = None
    max_train_examples: int = 0
    max_valid_examples: int = 0
    # the QA window defaults are long-document QA's own (`bigbird_ja.qa.settings`), which the pipeline shares
    max_length: int = QASettings.max_length
    doc_stride: int = QASettings.doc_stride
    max_query_length: int = QASettings.max_query_length
    long_document: bool = True
    on_mismatch: Literal["error", "skip"] = "error"
    windows_without_answer: Literal["cls", "drop"] = "cls"
    truncate: bool = QASettings.truncate
    train_articles: str | None = None
    valid_articles: str | None = None

    def __post_init__(self):
        for name in ("train_articles", "valid_articles"):
            value = getattr(self, name)
            if value is not None:
                parse_slice(value, f"data.{name}")
        _require(self.max_train_examples >= 0 and self.max_valid_examples >= 0,
                 "data.max_train_examples / max_valid_examples must be >= 0 (0: all)")
        _require(self.max_query_length >= 1, f"data.max_query_length={self.max_query_length}: must be >= 1")
        _require(self.max_length >= 2, f"data.max_length={self.max_length}: must be >= 2")
        _require(self.doc_stride >= 0, f"data.doc_stride={self.doc_stride}: must be >= 0")
        # QA windows also need max_length > max_query_length + 3 > doc_stride + ...: checked where they are built
        # (`bigbird_ja.qa.features`), since the classification tasks do not use those fields.


@dataclass
class TrainSection:
    """The training loop (AdamW, linear warmup, then linear decay to 0 or a constant rate).

    epochs: passes over the training features (fractions allowed) when max_steps is 0.
    max_steps: optimizer steps (0: from epochs).
    batch_size: features per forward/backward (a micro-batch).
    grad_accum_steps: micro-batches (per process) whose gradients are averaged into one optimizer step.
    lr: peak learning rate of AdamW.
    weight_decay: AdamW's, not on biases, LayerNorm weights and the relative-position embeddings.
    warmup_ratio: share of all optimizer steps spent in the linear warmup from 0.
    grad_clip: clip the global gradient norm to this (0: off).
    lr_schedule: after the linear warmup, "linear" decay to 0 at the last step or "constant".
    seed: model initialisation and data order (the same on every rank) and dropout (offset by the rank).
    device: "auto" (cuda when available), "cpu" or "cuda".
    precision: "fp32", or "bf16" (autocast on CUDA; fp32 weights).
    num_threads: torch CPU threads (0: torch's default).
    log_every_steps: a line in train_log.jsonl (loss, lr) every N steps.
    progress_bar: true, false or null (when stderr is a terminal).
    length_grouping: "none": batches drawn at random; "random": batches of similar lengths (less padding), in
        random order; "shortest_first": the same batches, shortest first in every epoch (a length curriculum).
    deepspeed: train through a DeepSpeed engine, data-parallel over the processes of the launcher that started
        the command (`deepspeed --num_gpus 8 --module bigbird_ja.cli finetune ...`, torchrun, mpirun, srun; one
        process works too). An optimizer step is then batch_size x grad_accum_steps x world size features; the
        same global batch gives the same run at any world size. Needs the `train` extra.
    zero_stage: ZeRO stage with deepspeed: 0 (plain data parallel), 1 (optimizer states sharded) or 2 (gradients
        too). Stage 3 is not offered: prediction runs each rank's share of the features on full weights.
    """

    epochs: float = 2.0
    max_steps: int = 0
    batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 3.0e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    lr_schedule: Literal["linear", "constant"] = "linear"
    grad_clip: float = 1.0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    num_threads: int = 0
    log_every_steps: int = 10
    progress_bar: bool | None = None
    length_grouping: Literal["none", "random", "shortest_first"] = "none"
    deepspeed: bool = False
    zero_stage: int = 0

    def __post_init__(self):
        _require(self.zero_stage in (0, 1, 2), f"train.zero_stage={self.zero_stage}: must be 0, 1 or 2 (stage 3 "
                 f"shards the weights, which prediction needs whole on every rank)")
        _require(self.deepspeed or self.zero_stage == 0,
                 f"train.zero_stage={self.zero_stage} needs train.deepspeed=true")
        _require(self.epochs > 0 or self.max_steps > 0, "train: give train.epochs > 0 or train.max_steps > 0")
        _require(self.max_steps >= 0, f"train.max_steps={self.max_steps}: must be >= 0 (0: from epochs)")
        _require(self.batch_size >= 1 and self.grad_accum_steps >= 1,
                 "train.batch_size and train.grad_accum_steps must be >= 1")
        _require(self.lr > 0, f"train.lr={self.lr}: must be > 0")
        _require(0 <= self.warmup_ratio < 1, f"train.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        _require(self.weight_decay >= 0 and self.grad_clip >= 0, "train.weight_decay and grad_clip must be >= 0")
        _require(self.num_threads >= 0, f"train.num_threads={self.num_threads}: must be >= 0")
        _require(self.log_every_steps >= 1, f"train.log_every_steps={self.log_every_steps}: must be >= 1")


@dataclass
class EvalSection:
    """Evaluation on data.valid after training.

    batch_size: features per forward pass.
    n_best: QA: start and end candidates per window.
    max_answer_tokens: QA: longest answer, in tokens.
    truncated_max_length: QA: also evaluate with every input truncated to this many tokens (one window, no
        sliding): the control of the long-range task (0: not done).
    """

    batch_size: int = 32
    n_best: int = QASettings.n_best
    max_answer_tokens: int = QASettings.max_answer_tokens
    truncated_max_length: int = 0

    def __post_init__(self):
        _require(self.batch_size >= 1, f"eval.batch_size={self.batch_size}: must be >= 1")
        _require(self.n_best >= 1 and self.max_answer_tokens >= 1, "eval.n_best and max_answer_tokens must be >= 1")
        _require(self.truncated_max_length >= 0, "eval.truncated_max_length must be >= 0 (0: off)")


@dataclass
class OutputSection:
    """Where the run writes.

    dir: the output folder (`--out`): config.yaml (the resolved config), train_log.jsonl, metrics.json,
        predictions.json, data_report.txt and, with save_model, model/.
    save_model: write the fine-tuned model to dir/model (save_pretrained, with the tokenizer).
    overwrite: write into a non-empty dir (refused otherwise).
    """

    dir: str = "runs/finetune"
    save_model: bool = True
    overwrite: bool = False


@dataclass
class SyntheticSection:
    """The generated long-range QA task (task longrange; see `bigbird_ja.finetune.longrange`).

    num_train, num_valid: documents (one question each).
    seq_len: tokens of a full input: [CLS] question [SEP] document [SEP].
    num_keys, num_values, num_filler_words: vocabulary sizes.
    num_facts: "key value" facts per document (distinct keys); the question names one of them.
    min_answer_position: every fact sits at or beyond this input position (tokens): beyond what truncation to it
        keeps. 0: anywhere.
    question_repeats: the question states the key this many times ("k3 k3 ... ?"). A model trained from scratch
        learns to match a document key with a single question token only after a long plateau; filling the
        global block with the key shortens it (see `longrange`).
    short_fraction, short_seq_len: that share of the training documents is short (seq_len short_seq_len, facts
        anywhere): cheap examples on which the key matching is learned first (a curriculum inside one data set).
    seed: generation seed (valid uses seed + 1).
    """

    num_train: int = 2000
    num_valid: int = 200
    seq_len: int = 1024
    num_keys: int = 16
    num_values: int = 16
    num_filler_words: int = 64
    num_facts: int = 2
    min_answer_position: int = 512
    question_repeats: int = 1
    short_fraction: float = 0.0
    short_seq_len: int = 64
    seed: int = 0

    def __post_init__(self):
        _require(self.num_train >= 1 and self.num_valid >= 1, "synthetic.num_train and num_valid must be >= 1")
        _require(1 <= self.num_facts <= self.num_keys,
                 f"synthetic.num_facts={self.num_facts} must be in [1, num_keys={self.num_keys}]")
        _require(self.num_values >= 2 and self.num_filler_words >= 2,
                 "synthetic.num_values and num_filler_words must be >= 2")
        _require(self.question_repeats >= 1, f"synthetic.question_repeats={self.question_repeats}: must be >= 1")
        _require(0 <= self.short_fraction <= 1, f"synthetic.short_fraction={self.short_fraction}: must be in [0, 1]")


@dataclass
class FinetuneConfig:
    """Everything `bigbird-ja finetune` is told; each component reads only its own section.

    task: the task (the registry `bigbird_ja.finetune.registry.TASKS` is the list); `bigbird-ja finetune TASK` sets
        it, and a preset that names another task is refused.
    model, data, train, eval, output, synthetic: the sections above.
    """

    task: str = "jsquad"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)

    def __post_init__(self):
        _require(self.task in TASKS, f"task={self.task!r} is not a fine-tuning task; the tasks are {list(TASKS)}")

    def qa_settings(self) -> QASettings:
        """The windows and span search of this run (data and eval sections): what a QA model is saved with."""
        return QASettings(max_length=self.data.max_length, doc_stride=self.data.doc_stride,
                          max_query_length=self.data.max_query_length, truncate=self.data.truncate,
                          n_best=self.eval.n_best, max_answer_tokens=self.eval.max_answer_tokens)

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False, allow_unicode=True, width=120)


def load_finetune_config(path=None, overrides: list[str] | dict | None = None) -> FinetuneConfig:
    """A `FinetuneConfig` from a preset (configs/finetune/*.yaml; None: the defaults) and overrides, strictly."""
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"fine-tune config {str(path)!r} does not exist (presets live in configs/finetune/)")
    return load_config(FinetuneConfig, path, overrides)


__all__ = [
    "ConfigError", "DataSection", "EvalSection", "FinetuneConfig", "ModelSection", "OutputSection",
    "SyntheticSection", "TrainSection", "load_finetune_config", "parse_slice",
]
