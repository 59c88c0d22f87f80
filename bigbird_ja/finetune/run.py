"""`finetune` and `evaluate`: the functions behind `bigbird-ja finetune` and `bigbird-ja evaluate`.

`finetune(task, config)`:
  1. resolve the config (the task, data files and model given on the command line are fields of it), refuse a
     non-empty output folder unless output.overwrite, print and save the resolved config as config.yaml;
  2. the long-range task generates its data and tokenizer into <out>/data (when data.train/valid are not given);
  3. load the tokenizer and the model (a checkpoint, or a preset from scratch), with the task's head;
  4. read and featurise the training and validation files; the data report goes to data_report.txt;
  5. train (train_log.jsonl), predict the validation file, write predictions.json and metrics.json (with the
     training summary and, when eval.truncated_max_length is set, the metrics of truncated inputs);
  6. save the model and tokenizer to <out>/model (output.save_model), checksums.json last (`save_model_folder`);
     a QA model carries the run's windows and span search in its config.json (`qa_settings`, read by the pipeline).
With train.deepspeed the command runs on every process of its launcher: rank 0 alone writes files, the ranks
share the training batches and the prediction features, and an error on rank 0 stops every rank.

`evaluate_predictions(task, predictions, data)` scores a predictions file alone (JSQuAD: SQuAD's format, one JSON
object mapping question id to answer text) and reports missing and unknown ids by count and example ids.
`evaluate_model(task, model, data, config)` runs a fine-tuned model over a data file and scores it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.atomic_io import atomic_write_text
from ..common.checksums import save_model_folder, verify_model_folder
from ..common.config_io import read_yaml
from ..common.distributed import broadcast_object, rank_and_world_size
from ..qa.settings import write_qa_settings
from .config import ConfigError, FinetuneConfig, load_finetune_config
from .jglue import read_json_file
from .tasks import QATask, Task, get_task
from .trainer import start_deepspeed


@dataclass
class FinetuneResult:
    output_dir: Path
    metrics: dict[str, Any]
    predictions: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class PredictionCheck:
    """Ids of a predictions file compared with the gold file."""

    total: int
    missing: list[str]
    unknown: list[str]

    def summary(self, max_examples: int = 5) -> str:
        lines = []
        for name, ids, what in (("missing", self.missing, "gold questions without a prediction (scored 0)"),
                                ("unknown", self.unknown, "predicted ids not in the gold file (ignored)")):
            if ids:
                more = f", ... and {len(ids) - max_examples} more" if len(ids) > max_examples else ""
                lines.append(f"{len(ids)} {what}: {', '.join(ids[:max_examples])}{more}")
        return "\n".join(lines) if lines else f"every one of the {self.total} gold ids has a prediction"


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _prepare_output(cfg: FinetuneConfig) -> Path:
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output.dir {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.output.overwrite:
            raise ValueError(f"output.dir {out} is not empty; choose a new folder or pass --output.overwrite=true "
                             f"to replace the run's files in it")
        for name in ("model", "data"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("train_log.jsonl", "metrics.json", "predictions.json", "data_report.txt", "config.yaml"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist (model.tokenizer, or the model folder)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is needed for character offsets; got "
                         f"{type(tokenizer).__name__}")
    return tokenizer


_HEADS = {"qa": "AutoModelForQuestionAnswering", "sequence": "AutoModelForSequenceClassification",
          "choice": "AutoModelForMultipleChoice"}


def load_model(cfg: FinetuneConfig, task: Task, tokenizer, *, verbose: bool = True, verify: bool = True):
    """The task's model: from model.init_from (new head where the checkpoint has none) or model.preset (random).
    ``verify``: check model.init_from against its checksums.json first (`verify_model_folder`)."""
    import transformers

    from ..configuration import build_model_config

    m = cfg.model
    if (m.init_from is None) == (m.preset is None):
        raise ConfigError("model: give exactly one of model.init_from (a checkpoint folder; --model DIR) or "
                          "model.preset (a model preset YAML or config folder, trained from scratch)")
    auto = getattr(transformers, _HEADS[task.head])
    head_kwargs = {"num_labels": task.num_labels} if task.head == "sequence" else {}
    if task.head == "sequence" and task.num_labels == 1:
        head_kwargs["problem_type"] = "regression"
    extra = {**head_kwargs, **m.overrides}
    source = m.init_from if m.init_from is not None else m.preset
    if m.init_from is not None or Path(source).is_dir():
        # a checkpoint's weights fix its sizes; what may change is how far it reads (see _extend_positions)
        if not Path(source).is_dir():
            raise FileNotFoundError(f"model folder {source} does not exist (a save_pretrained checkpoint, or a "
                                    f"folder with config.json)")
        sizes = sorted(set(extra) & {"hidden_size", "embedding_size", "intermediate_size", "num_attention_heads",
                                     "num_hidden_layers", "vocab_size"})
        if sizes:
            raise ConfigError(f"model.overrides {sizes} change the shapes of {source}'s weights; give sizes in a "
                              f"model preset (configs/model/*.yaml) trained from scratch instead")
        extra = _extend_positions(build_model_config(source), extra, source)
    if m.preset is not None:
        extra["vocab_size"] = len(tokenizer)
    config = build_model_config(source, extra)
    if m.init_from is not None and config.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} "
                         f"embeddings; use the checkpoint's own tokenizer")
    if cfg.data.max_length > config.max_position_embeddings:
        raise ValueError(f"data.max_length={cfg.data.max_length} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}; lower data.max_length (QA documents are windowed)")
    if m.init_from is not None:
        if verify:
            verify_model_folder(m.init_from)
        # verified above (or by the caller): the package's from_pretrained would hash the folder a second time
        model, info = auto.from_pretrained(m.init_from, config=config, output_loading_info=True, verify_checksums=False)
        if verbose:
            new = sorted(info.get("missing_keys", []))
            unused = sorted(info.get("unexpected_keys", []))
            print(f"loaded {m.init_from}; newly initialised: {new or 'nothing'}; not used: {unused or 'nothing'}")
    else:
        model = auto.from_config(config)
        if verbose:
            print(f"initialised {type(model).__name__} from scratch ({sum(p.numel() for p in model.parameters()):,} "
                  f"parameters) from {m.preset}")
    return model


def _extend_positions(config, overrides: dict, folder) -> dict:
    """Let a checkpoint read longer inputs than it was trained on (`model.overrides.max_position_embeddings`).

    With relative positions only (no absolute position embeddings) nothing has the length's shape; what must not
    change is the relative-bucket function, which DeBERTa derives from max_position_embeddings when
    max_relative_positions < 1. It is pinned to the checkpoint's value, so every distance the checkpoint knew keeps
    its bucket and longer ones share the last (as in `bigbird-ja convert --max-length`); so is the span the random
    blocks are drawn over (`random_block_span`), so inputs of the lengths it knew keep their random blocks. Returns
    the overrides to build the config with.
    """
    new = overrides.get("max_position_embeddings")
    if new is None or new == config.max_position_embeddings:
        return dict(overrides)
    if config.position_biased_input:
        raise ConfigError(f"model.overrides.max_position_embeddings={new}: {folder} adds absolute position "
                          f"embeddings ({config.max_position_embeddings} of them), which cannot change length "
                          f"without retraining; keep data.max_length <= {config.max_position_embeddings} (long "
                          f"documents are windowed)")
    pinned = dict(overrides)
    if config.relative_attention and config.max_relative_positions < 1 and "max_relative_positions" not in overrides:
        pinned["max_relative_positions"] = config.max_position_embeddings
    if config.random_block_span is None and "random_block_span" not in overrides:
        pinned["random_block_span"] = config.max_position_embeddings
    return pinned


def _names_task(preset) -> bool:
    return "task" in read_yaml(preset, "fine-tune config", "configs/finetune/")


def _resolve_inputs(task: str, cfg: FinetuneConfig, model: str | None, train: str | None, valid: str | None,
                    output: str | None) -> FinetuneConfig:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), data=dataclasses.replace(cfg.data),
                              output=dataclasses.replace(cfg.output))
    get_task(task)
    cfg.task = task
    if model is not None:
        cfg.model.init_from, cfg.model.preset = model, None
    if train is not None:
        cfg.data.train = train
    if valid is not None:
        cfg.data.valid = valid
    if output is not None:
        cfg.output.dir = output
    return cfg


def finetune(task: str, config: FinetuneConfig | str | Path | None = None, *, overrides: list[str] | None = None,
             model: str | None = None, train: str | None = None, valid: str | None = None,
             output: str | None = None, verbose: bool = True) -> FinetuneResult:
    """Fine-tune on `task` and evaluate on the validation file; see the module docstring for the steps.

    config: a `FinetuneConfig`, a preset path, or None (defaults). A preset's `task` must agree with `task`.
    model / train / valid / output: the command line's --model, --train-file, --valid-file, --out (they win over the config).
    """
    from .trainer import seed_everything, train_model

    if not isinstance(config, FinetuneConfig):
        preset = config
        config = load_finetune_config(preset, overrides)
        if preset is not None and _names_task(preset) and config.task != task:
            raise ConfigError(f"the preset {preset} is for task {config.task!r}, not {task!r}")
    elif overrides:
        raise ValueError("pass overrides with a preset path, or apply them to the FinetuneConfig yourself")
    cfg = _resolve_inputs(task, config, model, train, valid, output)
    spec = get_task(task)
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and not cfg.train.deepspeed:
        raise ConfigError(f"started as one of {launched} processes (WORLD_SIZE={launched}) but train.deepspeed is "
                          f"false: each process would train alone and overwrite the others' files; add "
                          f"--train.deepspeed=true, or run one process")
    if cfg.train.deepspeed:  # every rank joins before anything is written; rank 0 writes, the others wait
        start_deepspeed(cfg.train)
    main = rank_and_world_size()[0] == 0
    verbose = verbose and main
    out = Path(cfg.output.dir)
    files = {"config": out / "config.yaml", "log": out / "train_log.jsonl", "metrics": out / "metrics.json",
             "predictions": out / "predictions.json", "report": out / "data_report.txt"}
    started = time.perf_counter()

    def set_up() -> dict:
        _prepare_output(cfg)
        generated = {}
        if task == "longrange" and (cfg.data.train is None or cfg.data.valid is None):
            from .longrange import generate_longrange

            generated = {k: str(v) for k, v in generate_longrange(cfg.synthetic, out / "data").items()}
        return generated

    generated = _main_first(set_up)
    if generated:
        cfg.data.train = cfg.data.train or generated["train"]
        cfg.data.valid = cfg.data.valid or generated["valid"]
        cfg.model.tokenizer = generated["tokenizer"]
    if cfg.data.train is None or cfg.data.valid is None:
        raise ConfigError(f"task {task}: give the training and validation files (--train-file FILE --valid-file FILE, or "
                          f"data.train / data.valid)")
    if main:
        files["config"].write_text(cfg.to_yaml(), encoding="utf-8")
    if verbose:
        print(f"bigbird-ja finetune {task}: resolved config (saved as {files['config']})\n{cfg.to_yaml()}")

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.init_from or cfg.model.preset)
    seed_everything(cfg.train.seed)
    net = load_model(cfg, spec, tokenizer, verbose=verbose)
    train_set = spec.prepare(cfg.data.train, tokenizer, cfg.data, training=True,
                             max_examples=cfg.data.max_train_examples)
    valid_set = spec.prepare(cfg.data.valid, tokenizer, cfg.data, training=False,
                             max_examples=cfg.data.max_valid_examples)
    report = f"train {train_set.report}\nvalid {valid_set.report}"
    if main:
        files["report"].write_text(report + "\n", encoding="utf-8")
    if verbose:
        print(report)

    summary = train_model(net, train_set.features, train_set.collate, cfg.train, log_file=files["log"],
                          desc=f"{task} fine-tune")
    predictions, metrics = spec.predict(net, valid_set, cfg.eval, cfg.train)
    if isinstance(spec, QATask) and cfg.eval.truncated_max_length:
        truncated = spec.prepare(cfg.data.valid, tokenizer, cfg.data, training=False,
                                 max_examples=cfg.data.max_valid_examples,
                                 max_length=cfg.eval.truncated_max_length, truncate=True)
        _, metrics_truncated = spec.predict(net, truncated, cfg.eval, cfg.train)
        metrics[f"truncated_{cfg.eval.truncated_max_length}"] = metrics_truncated
    metrics["train"] = summary
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    if cfg.output.save_model:
        files["model"] = out / "model"
        # the pipeline answers with what the model was trained and evaluated with; other heads carry none (a QA
        # checkpoint's settings do not describe a classifier fine-tuned from it)
        write_qa_settings(net.config, cfg.qa_settings() if isinstance(spec, QATask) else None)

    def write_results() -> None:
        _write_json(files["predictions"], predictions)
        _write_json(files["metrics"], metrics)
        if cfg.output.save_model:
            save_model_folder(net, tokenizer, files["model"])

    _main_first(write_results)
    if verbose:
        print(f"{task}: {json.dumps({k: v for k, v in metrics.items() if k != 'train'}, ensure_ascii=False)}")
        print(f"wrote {out}")
    return FinetuneResult(out, metrics, predictions, files)


def _main_first(work: Callable[[], Any]) -> Any:
    """Run `work` on rank 0 only (everything in one process); every rank gets its result, or its error."""
    rank, world = rank_and_world_size()
    if world == 1:
        return work()
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as err:  # every rank must learn of it, or the others wait forever
            error = err
    result, message = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed, so this rank stops too: {message}")
    return result


def check_prediction_ids(predictions: dict[str, Any], golds: dict[str, Any]) -> PredictionCheck:
    return PredictionCheck(total=len(golds), missing=[i for i in golds if i not in predictions],
                           unknown=[i for i in predictions if i not in golds])


def evaluate_predictions(task: str, predictions: str | Path | dict, data: str | Path,
                         output: str | Path | None = None) -> tuple[dict[str, Any], PredictionCheck]:
    """Score a predictions file (id -> prediction) against a data file; write the metrics to `output` if given.

    JSQuAD: the output holds exactly {"exact_match", "f1", "total"}. Missing ids score 0; unknown ids are ignored;
    both are returned in the `PredictionCheck` (and printed by the CLI).
    """
    spec = get_task(task)
    if not isinstance(predictions, dict):
        path = Path(predictions)
        predictions = read_json_file(path, "predictions", "one object mapping id to prediction")
        if not isinstance(predictions, dict):
            raise ValueError(f"{path}: expected one JSON object mapping id to prediction, got "
                             f"{type(predictions).__name__}")
    if isinstance(spec, QATask):
        bad = [i for i, v in predictions.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"predictions must map question ids to answer texts; {len(bad)} are not strings "
                             f"(e.g. {bad[:3]})")
    golds = spec.golds(str(data))
    check = check_prediction_ids(predictions, golds)
    metrics = spec.score(predictions, golds)
    if output is not None:
        _write_json(Path(output), metrics)
    return metrics, check


def evaluate_model(task: str, model: str | Path, data: str | Path, config: FinetuneConfig | str | Path | None = None,
                   *, overrides: list[str] | None = None, output: str | Path | None = None,
                   predictions_out: str | Path | None = None) -> dict[str, Any]:
    """Run a fine-tuned model (a save_pretrained folder with its tokenizer) over `data` and score it. A folder with a
    checksums.json (`finetune` and `export` write one) is checked against it first: a damaged file is an error.

    config: the data and eval settings; None: the config.yaml of the run that saved the model (`<run>/model`'s
    parent) when there is one, else the defaults. `overrides` apply on top. The model and its tokenizer are the
    folder's own (the config's model section is not used).
    """
    if config is None and (Path(model).parent / "config.yaml").is_file():
        config = Path(model).parent / "config.yaml"
    if not isinstance(config, FinetuneConfig):
        config = load_finetune_config(config, overrides)
    elif overrides:
        raise ValueError("pass overrides with a preset path, or apply them to the FinetuneConfig yourself")
    cfg = _resolve_inputs(task, config, str(model), None, str(data), None)
    # The model is the checkpoint as saved (its config.json); the config's model section is not used.
    cfg.model.overrides, cfg.model.tokenizer = {}, None
    spec = get_task(task)
    verify_model_folder(model)  # before anything in it is read
    tokenizer = load_tokenizer(model)
    net = load_model(cfg, spec, tokenizer, verbose=False, verify=False)
    prepared = spec.prepare(str(data), tokenizer, cfg.data, training=False, max_examples=cfg.data.max_valid_examples)
    predictions, metrics = spec.predict(net, prepared, cfg.eval, cfg.train)
    if output is not None:
        _write_json(Path(output), metrics)
    if predictions_out is not None:
        _write_json(Path(predictions_out), predictions)
    return metrics


__all__ = ["FinetuneResult", "PredictionCheck", "check_prediction_ids", "evaluate_model", "evaluate_predictions",
           "finetune", "load_model", "load_tokenizer", "verify_model_folder"]
