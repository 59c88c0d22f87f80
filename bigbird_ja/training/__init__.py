"""Pretraining of BigBird-ja on DeepSpeed (`bigbird-ja pretrain`, `bigbird-ja export`).

Modules, one concept each:

* `config`       typed run-config sections, the batch identity and the DeepSpeed JSON of a run (loading, overrides
                 and the JSON builder are shared with fine-tuning in `bigbird_ja.common`)
* `preflight`    fail-fast checks every rank runs before training (open files, shards, tokenizer, disk, offload)
* `checkpoint`   atomic checkpoints (temporary folder, rename, `latest` last, keep last k), the run's identity,
                 `--resume auto`
* `flops`        model FLOPs counted for the block-sparse pattern; peak TFLOP/s of known GPUs (MFU)
* `reporting`    rank 0's console lines, metrics.jsonl and TensorBoard
* `trainer`      `pretrain`: a `Pretraining` whose methods are the phases of a run, with a typed `TrainState`
* `watchdog`     hung and dead ranks: heartbeats, phase timing, the stacks of a hung rank
* `faults`       fault injection for the tests and rehearsals (one hook the loop calls only when installed)
* `export`       a checkpoint as a save_pretrained folder
* `planner/`     `bigbird-ja plan`: hardware, activations, memory, timing, search, preset headers

Importing this package imports neither deepspeed nor the trainer's heavy dependencies; `pretrain` and
`export_checkpoint` import DeepSpeed when called (`pip install 'bigbird-ja[train]'`).
"""

from .config import (
    BatchPlan, ConfigError, PretrainConfig, deepspeed_config, load_config, load_pretrain_config, parse_overrides,
    resolve_batch,
)


def pretrain(*args, **kwargs):
    """See `bigbird_ja.training.trainer.pretrain`."""
    from .trainer import pretrain as _pretrain

    return _pretrain(*args, **kwargs)


def export_checkpoint(*args, **kwargs):
    """See `bigbird_ja.training.export.export_checkpoint`."""
    from .export import export_checkpoint as _export

    return _export(*args, **kwargs)


__all__ = [
    "BatchPlan", "ConfigError", "PretrainConfig", "deepspeed_config", "export_checkpoint", "load_config",
    "load_pretrain_config", "parse_overrides", "pretrain", "resolve_batch",
]
