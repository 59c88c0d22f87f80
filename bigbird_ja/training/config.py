"""The run configuration of `bigbird-ja pretrain`: typed sections, a strict YAML loader, overrides, DeepSpeed JSON.

A preset (``configs/pretrain/*.yaml``) is a mapping of sections; each section is a dataclass below whose docstring
says what every field means. Loading is strict: an unknown section or key is an error that lists the valid ones, and
a value of the wrong type is an error naming the key, the expected type and the value. Command-line overrides
(``--section.key=value``, values parsed as YAML) are merged into the same mapping and go through the same code, so
an override can do nothing a preset cannot. The resolved config is printed at start and saved as ``config.yaml``
beside the run and in every checkpoint; it loads back with `load_pretrain_config`.

The DeepSpeed JSON is generated from the config by `deepspeed_config`, never written by hand beside it.

Relative paths in a preset are relative to the current working directory: run from the repository root.

The loader (`load_config`, `from_dict`, `parse_overrides`) is `bigbird_ja.common.config_io`, shared with fine-tuning.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..common.deepspeed_json import deepspeed_json
from ..common.config_io import (  # noqa: F401  (ConfigError, load_config, parse_overrides, to_dict: public here too)
    ConfigError, load_config, parse_overrides, to_dict,
)

# ----------------------------------------------------------------------------------------------------------------
# Sections


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class RunSection:
    """What the run is called and where it writes.

    name: shown in logs and TensorBoard.
    output_dir: the run folder: config.yaml (resolved config), ds_config.json, metrics.jsonl, tensorboard/, and
        checkpoints/ unless checkpoint.dir says otherwise.
    seed: model initialisation (the same on every rank) and, offset by the rank, dropout.
    """

    name: str = "pretrain"
    output_dir: str = "runs/pretrain"
    seed: int = 0


@dataclass
class ModelSection:
    """The encoder.

    preset: a model preset (configs/model/*.yaml, strict BigBirdJaConfig fields) or a folder with config.json,
        trained from scratch; its vocab_size is replaced by the tokenizer's (len(tokenizer)).
    init_from: a save_pretrained folder (`bigbird-ja convert` / `export` output) whose weights start the run; its
        config.json defines the model (architecture, vocabulary size, padded or not) and its tokenizer is the one
        the data must be prepared with (checked at preflight). Exactly one of preset and init_from: with
        --model.init_from on the command line, the run preset's model section (a from-scratch preset and its
        overrides) is left out, and a note says so.
    overrides: BigBirdJaConfig fields laid over the preset or init_from's config (e.g. {attention_probs_dropout_prob:
        0.0}). Over init_from: no field that sizes a weight; a new max_position_embeddings keeps the checkpoint's
        function on the lengths it knew (`BigBirdJaConfig`, "Length and function").
    The resolved model config is saved as config.json in every checkpoint.
    """

    preset: str | None = None
    init_from: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _require(self.preset is not None or self.init_from is not None,
                 "model: give model.preset (e.g. configs/model/base-4096.yaml) or model.init_from (a checkpoint)")
        _require(self.preset is None or self.init_from is None,
                 f"model: model.preset={self.preset!r} and model.init_from={self.init_from!r} are both given, but "
                 f"the checkpoint's config.json defines its model: drop model.preset (--model.preset=null), and give "
                 f"any change as model.overrides")


@dataclass
class DataSection:
    """The prepared pretraining data (`bigbird-ja prepare` output) and its tokenizer.

    dir: the data folder with manifest.json.
    tokenizer: the tokenizer folder the data was prepared with (its fingerprint is checked against the manifest).
    eval_shards: the last N shards of the manifest are held out of training for the evaluation loss (0: no eval).
    shuffle_seed: shuffle seed of the sample stream (null: the seed prepare recorded).
    max_open_shards: shards memory-mapped at once per process (one file descriptor each).
    verify_checksums: rank 0 hashes every shard against the manifest at start (reads the whole data set once);
        sizes are always checked on every rank.
    """

    dir: str = "data/pretrain"
    tokenizer: str = "tokenizer"
    eval_shards: int = 1
    shuffle_seed: int | None = None
    max_open_shards: int = 8
    verify_checksums: bool = False

    def __post_init__(self):
        _require(self.eval_shards >= 0, f"data.eval_shards={self.eval_shards}: must be >= 0 (0: no evaluation)")
        _require(self.max_open_shards >= 1, f"data.max_open_shards={self.max_open_shards}: must be >= 1")


@dataclass
class PrepareSection:
    """How to build data.dir (and data.tokenizer) when they do not exist yet; rank 0 does it before training.

    inputs: files or folders for `bigbird-ja prepare`; "bundled:ja_sample" is the corpus shipped with the package.
        Empty: data.dir must already exist (the usual case at scale: prepare once, before the job).
    seq_len: tokens per packed sequence.
    shard_tokens: tokens per shard (the last data.eval_shards shards are the held-out set).
    tokenizer_vocab_size: vocabulary of the tokenizer trained on `inputs` when data.tokenizer does not exist
        (shrunk to the largest size the corpus supports).
    seed: recorded by prepare as the default shuffle seed.
    """

    inputs: list[str] = field(default_factory=list)
    seq_len: int = 4096
    shard_tokens: int = 1 << 29
    tokenizer_vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self):
        _require(self.seq_len >= 2, f"prepare.seq_len={self.seq_len}: must be >= 2")
        _require(self.shard_tokens >= self.seq_len, f"prepare.shard_tokens={self.shard_tokens}: must hold at least "
                 f"one sequence of prepare.seq_len={self.seq_len}")


@dataclass
class MaskingSection:
    """Masked-language-model targets (`bigbird_ja.data.MLMCollator`; see its docstring for the rules).

    mask_rate: share of maskable tokens chosen per sequence.
    span_length: "geometric" (SpanBERT) or "fixed"; max_span 1 is BERT's token masking.
    span_p: geometric parameter (mean span 1/p before clipping).
    max_span: longest span in tokens.
    mask_token_prob: probability that a chosen token becomes [MASK].
    random_token_prob: probability that a chosen token becomes a random token (otherwise it is kept).
    seed: masks are a function of (seed, the sample's place in the stream): identical after a resume.
    """

    mask_rate: float = 0.15
    span_length: Literal["geometric", "fixed"] = "geometric"
    span_p: float = 0.2
    max_span: int = 10
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    seed: int = 0

    def options(self):
        from ..data import MaskingOptions

        return MaskingOptions(mask_rate=self.mask_rate, span_length=self.span_length, span_p=self.span_p,
                              max_span=self.max_span, mask_token_prob=self.mask_token_prob,
                              random_token_prob=self.random_token_prob)

    def __post_init__(self):
        try:
            self.options()
        except ValueError as err:
            raise ConfigError(f"masking: {err}") from None


@dataclass
class BatchSection:
    """Batch sizes, in sequences. global_batch_size = micro_batch_size x grad_accum_steps x world_size.

    micro_batch_size: sequences per forward/backward on one device.
    global_batch_size: sequences per optimizer step, summed over all devices.
    grad_accum_steps: null: derived from the identity above (so a resume at another world size keeps the global
        batch); a number: checked against it.
    """

    micro_batch_size: int = 8
    global_batch_size: int = 256
    grad_accum_steps: int | None = None

    def __post_init__(self):
        _require(self.micro_batch_size >= 1, f"batch.micro_batch_size={self.micro_batch_size}: must be >= 1")
        _require(self.global_batch_size >= 1, f"batch.global_batch_size={self.global_batch_size}: must be >= 1")
        _require(self.grad_accum_steps is None or self.grad_accum_steps >= 1,
                 f"batch.grad_accum_steps={self.grad_accum_steps}: must be >= 1 or null (derived)")


@dataclass
class OptimSection:
    """AdamW (torch's implementation: fused on CUDA, foreach on CPU; nothing to compile) and its schedule.

    lr: peak learning rate.
    betas: AdamW's moment decay rates.
    eps: AdamW's denominator term.
    weight_decay: decoupled weight decay (none on 1-D parameters: biases and LayerNorm weights).
    schedule: "linear" (DeepSpeed WarmupDecayLR: linear warmup, then linear decay to 0 at train.max_steps) or
        "cosine" (WarmupCosineLR: linear warmup, then cosine decay to min_lr_ratio x lr).
    warmup_steps: optimizer steps of linear warmup from 0. (DeepSpeed's schedulers count from the first step(): the
        first two optimizer steps run at lr 0 and the peak is reached at step warmup_steps + 1.)
    min_lr_ratio: the cosine schedule's floor as a fraction of lr (the linear schedule always ends at 0).
    grad_clip: clip the global gradient norm to this (0: no clipping).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    schedule: Literal["linear", "cosine"] = "linear"
    warmup_steps: int = 10000
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        _require(self.lr > 0, f"optim.lr={self.lr}: must be > 0")
        _require(all(0 <= b < 1 for b in self.betas), f"optim.betas={list(self.betas)}: each must be in [0, 1)")
        _require(self.eps > 0, f"optim.eps={self.eps}: must be > 0")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay}: must be >= 0")
        _require(self.warmup_steps >= 1, f"optim.warmup_steps={self.warmup_steps}: must be >= 1 (DeepSpeed's "
                 f"schedulers need a positive warmup)")
        _require(0 <= self.min_lr_ratio < 1, f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1)")
        _require(self.schedule == "cosine" or self.min_lr_ratio == 0, f"optim.min_lr_ratio={self.min_lr_ratio}: "
                 f"the linear schedule decays to 0; use optim.schedule=cosine for a floor, or min_lr_ratio=0")
        _require(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip}: must be >= 0 (0: no clipping)")


@dataclass
class TrainSection:
    """The loop.

    max_steps: optimizer steps of the whole run (a resumed run continues to the same number).
    precision: "bf16" (mixed precision: bf16 weights and activations, fp32 master weights and optimizer state in
        ZeRO) or "fp32". fp16 is not offered: DeBERTa's disentangled scores overflow it.
    activation_checkpointing: recompute each layer's activations in the backward pass (memory for ~30% time).
    cpu_threads: torch threads per process when training on CPU (null: OMP_NUM_THREADS if set, else 1). More help
        only larger models on an otherwise idle machine: OpenMP threads that wait for a core another process is
        using make a step up to 30x slower (measured on a busy 2-core machine: 0.16 s -> 4.8 s).
    """

    max_steps: int = 100000
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    cpu_threads: int | None = None

    def __post_init__(self):
        _require(self.max_steps >= 1, f"train.max_steps={self.max_steps}: must be >= 1")
        _require(self.cpu_threads is None or self.cpu_threads >= 1,
                 f"train.cpu_threads={self.cpu_threads}: must be >= 1 or null")


@dataclass
class ZeroSection:
    """DeepSpeed ZeRO and communication (copied into the generated DeepSpeed JSON).

    stage: 0 (data parallel, replicated optimizer), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ weights).
    overlap_comm: overlap gradient reduction with the backward pass (uses bucket-sized extra buffers).
    contiguous_gradients: copy gradients into one buffer as they are produced (less fragmentation).
    reduce_bucket_size: elements reduced per collective (stages 1-3). Larger: fewer, more efficient collectives;
        memory ~ 2-4 x size bytes per buffer with overlap_comm.
    allgather_bucket_size: elements gathered per collective when updated weights are shared (stages 1-2).
    stage3_prefetch_bucket_size: ZeRO-3: elements of upcoming weights gathered ahead of use.
    stage3_param_persistence_threshold: ZeRO-3: weights smaller than this stay whole on every rank (no gathers).
    stage3_max_live_parameters: ZeRO-3: gathered weight elements kept alive at once (bounds memory).
    offload_optimizer: "none" or "cpu". Off by default: at scale it was a source of failures. Allowed when asked
        for, with a warning on more than one node; torch's AdamW runs on the CPU (no DeepSpeed op to compile).
    """

    stage: int = 1
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    offload_optimizer: Literal["none", "cpu"] = "none"

    def __post_init__(self):
        _require(self.stage in (0, 1, 2, 3), f"zero.stage={self.stage}: must be 0, 1, 2 or 3")
        for name in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
            _require(getattr(self, name) >= 1, f"zero.{name}={getattr(self, name)}: must be >= 1")
        _require(self.offload_optimizer == "none" or self.stage >= 1,
                 f"zero.offload_optimizer={self.offload_optimizer!r} needs zero.stage >= 1")


@dataclass
class CheckpointSection:
    """Checkpoints: model, optimizer, scheduler, data cursor, RNG states and resolved config, written atomically.

    dir: where step-NNNNNNNN folders and the `latest` pointer go (null: <run.output_dir>/checkpoints). Must be on a
        file system every rank sees.
    every_steps: save every N optimizer steps (0: only at the end / on SIGTERM).
    keep_last: keep the newest k complete checkpoints, delete older ones after a new one is complete.
    save_on_sigterm: on SIGTERM (preemption, SLURM time limit), finish the current step, save and exit.
    """

    dir: str | None = None
    every_steps: int = 1000
    keep_last: int = 3
    save_on_sigterm: bool = True

    def __post_init__(self):
        _require(self.every_steps >= 0, f"checkpoint.every_steps={self.every_steps}: must be >= 0")
        _require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last}: must be >= 1")


@dataclass
class EvalSection:
    """Evaluation loss on the held-out shards (data.eval_shards).

    every_steps: evaluate every N optimizer steps (0: only at the end).
    samples: the first N samples of the held-out stream, at any world size (rounded down to a multiple of
        micro_batch_size x world_size); the same samples and masks every time.
    """

    every_steps: int = 1000
    samples: int = 1024

    def __post_init__(self):
        _require(self.every_steps >= 0, f"eval.every_steps={self.every_steps}: must be >= 0")
        _require(self.samples >= 1, f"eval.samples={self.samples}: must be >= 1")


@dataclass
class LogSection:
    """What rank 0 reports.

    every_steps: a log line (loss, lr, grad norm, tokens/s, samples/s, TFLOP/s per device, MFU, peak memory) every
        N steps; metrics.jsonl gets the same record.
    progress_bar: true, false, or null (when stderr is a terminal).
    tensorboard: true (required), false, or null (when tensorboard is installed).
    peak_tflops: the device's peak dense TFLOP/s for MFU (null: from a table of known GPUs for the precision; no
        MFU on CPU).
    sample_log: every rank writes the stream positions it reads to samples-rank<R>.jsonl (audits, tests).
    """

    every_steps: int = 10
    progress_bar: bool | None = None
    tensorboard: bool | None = None
    peak_tflops: float | None = None
    sample_log: bool = False

    def __post_init__(self):
        _require(self.every_steps >= 1, f"log.every_steps={self.every_steps}: must be >= 1")


@dataclass
class PreflightSection:
    """Checks every rank runs before training (see `preflight`); each failure stops all ranks with a message.

    raise_open_file_limit: raise the soft RLIMIT_NOFILE to the hard limit when it is below what the run needs.
    extra_open_files: descriptors to allow for beyond the estimate (site-specific libraries, profilers).
    check_disk: require free space for keep_last + 1 checkpoints (estimated from the parameter count) at start.
    """

    raise_open_file_limit: bool = True
    extra_open_files: int = 0
    check_disk: bool = True


@dataclass
class DistributedSection:
    """The process group (`bigbird_ja.common.distributed`).

    timeout_minutes: how long a collective (and the start-up rendezvous) waits for the other ranks before it fails
        on every rank that waits: the bound on a job left hanging by a dead or stopped rank when neither the
        launcher nor the watchdog has ended it first. Passed to init_process_group (gloo and NCCL). It must exceed
        the longest wait of a healthy run: rank 0 alone converting a checkpoint to the universal format, hashing
        the data (data.verify_checksums) or committing a checkpoint while the others wait. 30 minutes is 2% of a
        24-hour job; torch's and DeepSpeed's default (10) is short for checkpoint phases at scale.
    """

    timeout_minutes: float = 30.0

    def __post_init__(self):
        _require(self.timeout_minutes > 0, f"distributed.timeout_minutes={self.timeout_minutes}: must be > 0")


@dataclass
class WatchdogSection:
    """Finding a hung rank (`bigbird_ja.training.watchdog`): a thread on every rank times each phase of the loop (a
    training step, an evaluation, a checkpoint); one that takes far longer than usual writes this rank's Python
    stack to <run.output_dir>/watchdog/, names the ranks that made no progress and ends the process (the launcher
    then stops the rest). Without it a stopped rank holds the others for distributed.timeout_minutes.

    enabled: true (on, even for one process), false (off: no thread, no heartbeat files) or null: hang detection
        when the run spans more than one node, heartbeats only on one node of several processes.
    factor: a phase that takes longer than factor x the median of its recent durations counts as hung...
    min_seconds: ...and never one shorter than this (a first step, an evaluation or a checkpoint is not timed
        until that phase has 3 recent durations: those are bounded by distributed.timeout_minutes).
    window: the recent durations of each phase the median is taken over.
    heartbeat_seconds: how often each rank rewrites watchdog/rank-NNNNN.json (its step, phase, pid, host), from
        which the watchdog, and a rank whose collective failed, tell which rank stopped or died.
    """

    enabled: bool | None = None
    factor: float = 10.0
    min_seconds: float = 300.0
    window: int = 50
    heartbeat_seconds: float = 10.0

    def __post_init__(self):
        _require(self.factor > 1, f"watchdog.factor={self.factor}: must be > 1 (a step's own median is not a hang)")
        _require(self.min_seconds > 0, f"watchdog.min_seconds={self.min_seconds}: must be > 0")
        _require(self.window >= 3, f"watchdog.window={self.window}: must be >= 3")
        _require(self.heartbeat_seconds > 0, f"watchdog.heartbeat_seconds={self.heartbeat_seconds}: must be > 0")


@dataclass
class PretrainConfig:
    """Everything `bigbird-ja pretrain` is told; each component reads only its own section."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="configs/model/base-4096.yaml"))
    data: DataSection = field(default_factory=DataSection)
    prepare: PrepareSection = field(default_factory=PrepareSection)
    masking: MaskingSection = field(default_factory=MaskingSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    zero: ZeroSection = field(default_factory=ZeroSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    preflight: PreflightSection = field(default_factory=PreflightSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run.output_dir) / "checkpoints"

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False, allow_unicode=True, width=120)


def load_pretrain_config(path=None, overrides: list[str] | dict | None = None, *, log=None) -> PretrainConfig:
    """A `PretrainConfig` from a preset and ``--section.key=value`` overrides (strict; see the module docstring).

    A warm start given on the command line (``--model.init_from=FOLDER``) over a run preset whose model section is
    a from-scratch model: that section (model.preset and its overrides, e.g. a shorter max_position_embeddings) is
    left out, since the checkpoint defines the model; ``log`` (default: stderr) gets a note naming what was left."""
    from ..common.config_io import from_dict, merge, read_yaml

    what, presets = "pretraining config", "configs/pretrain/"
    given = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    data = read_yaml(path, what, presets) if path is not None else {}
    cli_model = given.get("model") if isinstance(given.get("model"), dict) else {}
    file_model = data.get("model") if isinstance(data.get("model"), dict) else {}
    if cli_model.get("init_from") is not None and file_model.get("init_from") is None and file_model:
        left = ", ".join(f"model.{k}={v!r}" for k, v in file_model.items())
        data = {**data, "model": {}}
        (log or (lambda text: print(text, file=sys.stderr)))(
            f"note: --model.init_from={cli_model['init_from']} defines the model; the run preset's {left} "
            f"{'is' if len(file_model) == 1 else 'are'} not used (give --model.overrides.KEY=VALUE to change a "
            f"setting of the checkpoint)")
    return from_dict(PretrainConfig, merge(data, given) if given else data,
                     where=str(path) if path is not None else "config")


# ----------------------------------------------------------------------------------------------------------------
# Batch identity and the DeepSpeed JSON


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of one run: global = micro x accum x world (sequences)."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size


def resolve_batch(batch: BatchSection, world_size: int) -> BatchPlan:
    """Check global = micro x accumulation x world and derive the accumulation steps; errors name the fix."""
    if world_size < 1:
        raise ConfigError(f"world_size={world_size}: must be >= 1")
    micro, glob = batch.micro_batch_size, batch.global_batch_size
    per_step = micro * world_size
    if batch.grad_accum_steps is not None:
        if micro * batch.grad_accum_steps * world_size != glob:
            raise ConfigError(
                f"batch: global_batch_size={glob} != micro_batch_size={micro} x grad_accum_steps="
                f"{batch.grad_accum_steps} x world_size={world_size} = {micro * batch.grad_accum_steps * world_size}. "
                f"Set batch.grad_accum_steps=null to derive it, or make the product equal global_batch_size")
        return BatchPlan(micro, batch.grad_accum_steps, world_size)
    if glob % per_step != 0:
        lower = max(per_step, glob // per_step * per_step)
        raise ConfigError(
            f"batch: global_batch_size={glob} is not a multiple of micro_batch_size={micro} x world_size="
            f"{world_size} = {per_step}, so no whole number of accumulation steps gives it. Use "
            f"global_batch_size={lower} or {lower + per_step}, or another micro_batch_size")
    return BatchPlan(micro, glob // per_step, world_size)


def deepspeed_config(cfg: PretrainConfig, plan: BatchPlan, *, cuda: bool, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for this run (ZeRO, precision, batch, clipping, optimizer, schedule), generated from cfg.

    cuda: the optimizer is torch's fused AdamW on CUDA and its foreach AdamW on CPU; neither needs a DeepSpeed op
    build ("torch_adam"), so no rank JIT-compiles anything at start.
    load_universal: the checkpoint to resume was converted to DeepSpeed's universal format (world size changed).
    """
    z = cfg.zero
    o = cfg.optim
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        zero.update(overlap_comm=z.overlap_comm, contiguous_gradients=z.contiguous_gradients,
                    reduce_scatter=True, reduce_bucket_size=z.reduce_bucket_size)
    if z.stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=z.allgather_bucket_size)
    if z.stage == 3:
        zero.update(stage3_prefetch_bucket_size=z.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=z.stage3_param_persistence_threshold,
                    stage3_max_live_parameters=z.stage3_max_live_parameters,
                    stage3_gather_16bit_weights_on_model_save=False)
    if z.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    max_steps = cfg.train.max_steps
    if o.schedule == "linear":
        scheduler = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": max_steps, "warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
            "warmup_num_steps": o.warmup_steps, "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max_steps, "warmup_min_ratio": 0.0, "warmup_num_steps": o.warmup_steps,
            "cos_min_ratio": o.min_lr_ratio, "warmup_type": "linear"}}
    return deepspeed_json(micro_batch_size=plan.micro_batch_size, grad_accum_steps=plan.grad_accum_steps,
                          world_size=plan.world_size, grad_clip=o.grad_clip, bf16=cfg.train.precision == "bf16",
                          zero=zero, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, cuda=cuda,
                          scheduler=scheduler, load_universal=load_universal)
