"""`pretrain`: masked-language-model pretraining of BigBird-ja on DeepSpeed, resumable exactly.

The same function runs as one process, under the `deepspeed` launcher, `torchrun`, `mpirun` or `srun` (see
`bigbird_ja.common.distributed`). `pretrain` starts the process group and hands over to a `Pretraining`, whose
methods are the phases of a run, in order:

1. `prepare_data`: if data.dir does not exist and prepare.inputs are given, rank 0 trains a tokenizer (if needed)
   and runs `prepare`; every rank then runs the preflight checks (`preflight`), and checks that prepare.seq_len is
   the length data.dir was packed at (the data's length is the one trained at; config.yaml must not say another).
   Any failure on any rank stops every rank, each rank's message printed.
2. `build_model`: the preset + overrides, vocab_size from the tokenizer, initialised from run.seed on every rank;
   then the disk check, which needs the parameter count.
3. `choose_checkpoint`: `--resume auto` takes the newest checkpoint of this run (its identity: checkpoints/run.json)
   that verifies (sizes, sha256, rng files), skipping damaged ones with a warning, naming other runs' step folders
   and refusing when step folders exist but none of this run's is usable, or when the run would have to save over
   another run's; `--resume PATH` of another run's checkpoint forks it (a new run). At another world size (or ZeRO
   stage) the checkpoint will be converted to DeepSpeed's universal format.
4. `open_data_streams`: training reads all but the last data.eval_shards shards from the checkpoint's cursor;
   evaluation reads the first eval.samples of the held-out shards.
5. `write_run_files` (the resolved config, the DeepSpeed JSON generated from it, the model config; printed only
   with --dry-run), then `start_engine`: the engine, then the checkpoint's weights, optimizer, scheduler and RNG.
6. `train`: `train_step` (accumulation over micro-batches), `log`, `evaluate`, `save`: every N steps, at the end
   and on SIGTERM. Each is a phase the watchdog times (`watchdog`: heartbeats, a hung phase ends the run, the ranks
   lost named); every collective gives up after distributed.timeout_minutes.
   A rehearsal's fault ($BIGBIRD_JA_FAULT, `faults`) strikes through `Pretraining.fault_hook`, None otherwise.

The trainer's state (`TrainState`: step, samples, tokens; with the data cursor and each rank's RNG) is saved in
every checkpoint and restored on resume: a run killed after its checkpoint at step k and resumed repeats steps
k+1.. exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TextIO

import torch

from ..common.atomic_io import atomic_write_text
from ..common.distributed import (
    DistEnv, agree, any_rank_flags, barrier, broadcast_object, import_deepspeed, init_process_group,
)
from ..common.optim import parameter_groups, rank_seed, seed_everything
from .checkpoint import (
    ENGINE_TAG, CheckpointWriter, RunIdentity, choose_resume, convert_to_universal, engine_load_dir,
    foreign_in_the_way, list_checkpoints, load_rng, read_meta, set_rng_state, universal_dir,
)
from .config import BatchPlan, ConfigError, PretrainConfig, deepspeed_config, resolve_batch, to_dict
from .faults import FaultHook, FaultInjection, FaultPoint
from .flops import peak_tflops, training_flops
from .preflight import (
    PreflightError, check_checkpoint_disk, estimate_open_files, format_problems, raise_open_file_limit, run_preflight,
)
from .reporting import Reporter, fmt, peak_memory_gib
from .watchdog import Watchdog, enable_crash_stacks

if TYPE_CHECKING:  # the state's types only: the phases import these modules when they run
    from deepspeed.runtime.engine import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

    from ..configuration import BigBirdJaConfig
    from ..data import MLMCollator, PackedDataset
    from ..modeling import BigBirdJaForMaskedLM

BUNDLED_CORPUS = "bundled:ja_sample"


@dataclass
class PretrainResult:
    """What a finished (or stopped) `pretrain` call did; `losses` maps step -> mean training loss of that step
    (steps that were logged)."""

    output_dir: str
    final_step: int
    stop_reason: str  # "max_steps" or "sigterm"
    resumed_from: str | None
    last_checkpoint: str | None
    losses: dict[int, float] = field(default_factory=dict)
    eval_losses: dict[int, float] = field(default_factory=dict)


@dataclass
class TrainState:
    """What the loop has done, saved in every checkpoint (with the data cursor, `PackedDataset.state_dict`)."""

    step: int = 0  # optimizer steps taken
    samples: int = 0  # sequences consumed, over all ranks
    tokens: int = 0  # tokens consumed, over all ranks

    def advance(self, global_batch_size: int, seq_len: int) -> None:
        self.step += 1
        self.samples += global_batch_size
        self.tokens += global_batch_size * seq_len


@dataclass
class LogWindow:
    """The steps since the last log line: their summed micro-batch losses and the wall time they took."""

    loss: torch.Tensor  # float64 sum of micro-batch losses on this rank
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def new(cls, device) -> "LogWindow":
        return cls(torch.zeros((), dtype=torch.float64, device=device))

    def restart_clock(self) -> None:
        """Evaluation and checkpoint time is not training throughput."""
        self.started = time.perf_counter()


# ----------------------------------------------------------------------------------------------------------------
# Set-up helpers


def _cpu_threads(requested: int | None) -> int:
    """train.cpu_threads, else OMP_NUM_THREADS, else 1 (see TrainSection for why not all cores)."""
    threads = requested or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
    torch.set_num_threads(threads)
    return threads


def _resolve_inputs(inputs: list[str]) -> list[str]:
    from ..data import sample_corpus_path

    return [str(sample_corpus_path()) if x == BUNDLED_CORPUS else x for x in inputs]


def _holds_tokenizer(folder: Path) -> bool:
    """A saved tokenizer: tokenizer.json, or a tokenizer_config.json beside SentencePiece files (spm-only)."""
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def ensure_data(cfg: PretrainConfig, log=print) -> None:
    """Build data.tokenizer and data.dir from prepare.inputs when they do not exist (call on one process).

    A warm start (model.init_from) never trains a tokenizer: the data must be the checkpoint's tokenizer's ids."""
    data_dir, tok_dir = Path(cfg.data.dir), Path(cfg.data.tokenizer)
    if (data_dir / "manifest.json").is_file() or not cfg.prepare.inputs:
        return  # present, or nothing to build it from (preflight says what is missing)
    from .preflight import check_model_folder_untouched

    problems = check_model_folder_untouched(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    from ..data import prepare

    inputs = _resolve_inputs(cfg.prepare.inputs)
    if not _holds_tokenizer(tok_dir):
        if cfg.model.init_from:
            raise ValueError(f"data.tokenizer={str(tok_dir)!r} holds no tokenizer, and a warm start trains none: "
                             f"the data must be tokenised with the checkpoint's own tokenizer. Pass "
                             f"--data.tokenizer={cfg.model.init_from}")
        texts = [p for p in inputs if p.endswith(".txt")]
        if len(texts) != len(inputs):
            raise ValueError(f"data.tokenizer={str(tok_dir)!r} does not exist and prepare.inputs are not all .txt "
                             f"files, which a tokenizer is trained on: train one first (`bigbird-ja train-tokenizer "
                             f"--input ... --out {tok_dir}`)")
        from ..tokenization import train_tokenizer

        report = train_tokenizer(texts, tok_dir, cfg.prepare.tokenizer_vocab_size, shrink_vocab=True,
                                 model_max_length=cfg.prepare.seq_len, seed=cfg.prepare.seed)
        log(report.summary().splitlines()[0])
    # In-process tokenisation: this path is for small inputs (prepare big corpora before the job, on many cores).
    report = prepare(tok_dir, inputs, data_dir, seq_len=cfg.prepare.seq_len, seed=cfg.prepare.seed, num_workers=0,
                     shard_tokens=cfg.prepare.shard_tokens, progress=False)
    log(report.summary())


# BigBirdJaConfig fields that size a weight: a checkpoint's are fixed (what may change is how far it reads)
WEIGHT_SHAPE_FIELDS = ("hidden_size", "embedding_size", "intermediate_size", "num_attention_heads",
                       "num_hidden_layers", "vocab_size", "type_vocab_size", "position_buckets", "relative_attention",
                       "position_biased_input", "share_att_key", "pos_att_type", "conv_kernel_size", "conv_groups")


def resolve_model_config(cfg: PretrainConfig, vocab_size: int, seq_len: int):
    """The run's BigBirdJaConfig, through the one builder (`bigbird_ja.configuration.build_model_config`); checked
    against the data. From scratch: model.preset + model.overrides, vocab_size = the tokenizer's (``vocab_size``).
    Warm start: model.init_from's config.json + model.overrides (none that sizes a weight; a new length keeps the
    checkpoint's function); its vocabulary (padded or not) must hold the tokenizer's ``vocab_size`` ids."""
    from ..configuration import build_model_config

    if cfg.model.init_from:
        source = Path(cfg.model.init_from)
        if not (source / "config.json").is_file():
            raise ConfigError(f"model.init_from={str(source)!r} is not a model folder (no config.json): give a "
                              f"`bigbird-ja convert` or `export` output")
        sizes = sorted(set(cfg.model.overrides) & set(WEIGHT_SHAPE_FIELDS))
        if sizes:
            raise ConfigError(f"model.overrides {sizes} would change the shapes of {source}'s weights; a warm start "
                              f"keeps them (train a new size from a preset: model.preset)")
        try:
            config = build_model_config(source, cfg.model.overrides)
        except ValueError as err:
            raise ConfigError(f"model.init_from={str(source)!r}: {err}") from None
        if config.vocab_size < vocab_size:
            raise ConfigError(f"the data's tokenizer has {vocab_size} ids but model.init_from={str(source)!r} has "
                              f"only {config.vocab_size} embeddings: prepare the data with the checkpoint's own "
                              f"tokenizer (`bigbird-ja prepare --tokenizer {source} ...`)")
    else:
        config = build_model_config(cfg.model.preset, {**cfg.model.overrides, "vocab_size": vocab_size})
    if config.max_position_embeddings < seq_len:
        lengthen = (f"lengthen the checkpoint first (`bigbird-ja convert {cfg.model.init_from} NEW_FOLDER "
                    f"--max-length {seq_len}`) or " if cfg.model.init_from else "")
        raise ConfigError(f"model: max_position_embeddings={config.max_position_embeddings} is below the data's "
                          f"seq_len={seq_len}; {lengthen}set model.overrides.max_position_embeddings >= {seq_len} "
                          f"or prepare shorter sequences")
    return config


def _model_config_differences(saved: dict, current: dict) -> list[str]:
    ignore = {"transformers_version", "architectures", "torch_dtype", "dtype", "_name_or_path"}
    keys = sorted((set(saved) | set(current)) - ignore)
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _stop_if_problems(problems: list[str], what: str) -> None:
    """Every rank's problems on every rank: all stop together, each rank's message printed (nobody left hanging)."""
    by_rank = agree(problems)
    if by_rank:
        raise PreflightError(format_problems(by_rank) if what == "preflight" else
                             f"{what} failed:\n" + "\n".join(f"  [rank {r}] {m}" for r, ms in sorted(by_rank.items())
                                                            for m in ms))


def _on_main(env: DistEnv, action) -> list[str]:
    """Run ``action`` on rank 0; its exception as a problem message (for `_stop_if_problems`), else []."""
    if not env.is_main:
        return []
    try:
        action()
    except Exception as err:  # reported by every rank
        return [f"{type(err).__name__}: {err}"]
    return []


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def mlm_loss_sums(forward, batches, device) -> tuple[float, int]:
    """(sum over batches of mean-loss x masked tokens, masked tokens): the exact token-mean loss of a set of batches,
    whatever their grouping. ``forward(batch) -> loss`` (mean over the batch's masked tokens)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for batch in batches:
        n = int((batch["labels"] != -100).sum())
        if n == 0:
            continue
        loss = forward(batch)
        total += loss.detach().double() * n
        count += n
    return float(total), count


def eval_batches(dataset, collator, micro_batch_size: int, num_batches: int):
    """The first ``num_batches`` micro-batches of this rank's share of the (unshuffled) held-out stream."""
    it = iter(dataset)
    for _ in range(num_batches):
        samples = [next(it) for _ in range(micro_batch_size)]
        yield collator(samples)


def module_grad_norm(module) -> float | None:
    """The global L2 norm of the gradients held in ``module``'s parameters, or None when none holds one (DeepSpeed's
    bf16 and ZeRO optimizers keep gradients in their own buffers: a norm over nothing is not 0)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


def apply_changed_optimizer_settings(engine, cfg: PretrainConfig, saved_config: dict) -> list[str]:
    """After a resume, make changed optim settings take effect at the first resumed step; returns what changed.

    The checkpoint brings back the optimizer's param groups (lr, betas, eps, weight decay) and the scheduler's step
    count; the scheduler's shape (peak lr, warmup, total steps) comes from the current config. Without this the
    first resumed step would run at the checkpoint's lr (the scheduler writes the new one only after it) and the
    checkpoint's betas, eps and weight decay would stay for good.
    """
    saved, current = saved_config.get("optim", {}), to_dict(cfg)["optim"]
    changed = [f"optim.{key}: {saved.get(key)!r} -> {current[key]!r}" for key in current
               if saved.get(key) != current[key]]
    if saved_config.get("train", {}).get("max_steps") != cfg.train.max_steps:
        changed.append(f"train.max_steps: {saved_config.get('train', {}).get('max_steps')!r} -> "
                       f"{cfg.train.max_steps!r} (the schedule's length)")
    if not changed:
        return []
    groups = engine.optimizer.param_groups
    for index, group in enumerate(groups):  # `parameter_groups`: [decayed, not decayed]
        group["betas"], group["eps"] = tuple(cfg.optim.betas), cfg.optim.eps
        group["weight_decay"] = cfg.optim.weight_decay if index == 0 else 0.0
    scheduler = engine.lr_scheduler
    scheduler.step(scheduler.last_batch_iteration)  # the current step again: writes its lr, does not advance
    return changed


class TrainingStopped(RuntimeError):
    """The run stopped on a condition it explains (non-finite loss or gradients, out of memory); nothing from the
    failing step was saved, and the message names the last checkpoint and what to change."""


def out_of_memory_error(err: BaseException, cfg: PretrainConfig, step: int, seq_len: int,
                        last_checkpoint: str | None) -> TrainingStopped | None:
    """A `TrainingStopped` naming an out-of-memory failure (CUDA's, or the CPU allocator's) and what to change, or
    None for any other error."""
    text = str(err)
    oom = isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()))
    if not oom:
        return None
    return TrainingStopped(
        f"out of memory in step {step} (micro_batch_size={cfg.batch.micro_batch_size} x {seq_len} tokens, "
        f"zero.stage={cfg.zero.stage}, activation_checkpointing={cfg.train.activation_checkpointing}): lower "
        f"batch.micro_batch_size (the accumulation keeps the global batch), set train.activation_checkpointing=true "
        f"or raise zero.stage; the last checkpoint is {last_checkpoint} ({type(err).__name__}: {text[:300]})")


# ----------------------------------------------------------------------------------------------------------------
# pretrain


def pretrain(cfg: PretrainConfig, *, resume: str | None = None, dry_run: bool = False) -> PretrainResult | None:
    """Run (or continue) the pretraining described by ``cfg``; see the module docstring.

    resume: None / "none" (fresh; an error if checkpoints exist), "auto" (the newest checkpoint that verifies, or fresh),
        or a checkpoint path.
    dry_run: stop after the preflight checks, printing the resolved config and the DeepSpeed JSON.
    """
    deepspeed = import_deepspeed()
    cuda = torch.cuda.is_available()
    env = init_process_group(cuda, timeout=timedelta(minutes=cfg.distributed.timeout_minutes),
                             trace_dir=Path(cfg.run.output_dir) / "watchdog")
    try:
        # $BIGBIRD_JA_FAULT: a rehearsal's fault (`faults`); unset, the loop has no hook to call
        return Pretraining(cfg, deepspeed, env, cuda, fault_hook=FaultInjection.from_env()).run(resume, dry_run)
    finally:  # every way out, errors included: without it the interpreter can abort at exit (ZeRO-3 threads)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Pretraining:
    """One pretraining run on this process; each method is a phase of the module docstring, called in order by
    `run`.

    Everything the trainer holds is declared below, with its type, under the phase that sets it; later phases read
    it. Nothing else is set on a `Pretraining` (tests/test_trainer_state.py checks it after a dry run and a run).
    """

    # -- given, and derived from them (`__init__`) -------------------------------------------------------------------
    cfg: PretrainConfig
    deepspeed: ModuleType  # the imported package: its `initialize` builds the engine
    env: DistEnv  # rank, world size, nodes, backend
    cuda: bool
    device: torch.device  # this rank's GPU, or the CPU
    threads: int | None  # torch's CPU threads in this process (None on a GPU)
    plan: BatchPlan  # micro-batch x accumulation x world size = the global batch
    out: Path  # run.output_dir
    state: TrainState  # step, samples, tokens: replaced by the checkpoint's in `start_engine`
    fault_hook: FaultHook | None = None  # rehearsals and tests only (`faults`): the loop calls it when installed

    # -- 1. prepare_data (or plan_data, in a dry run whose data is still to be made) ---------------------------------
    tokenizer: PreTrainedTokenizerBase | None  # None only in such a dry run without a tokenizer yet
    manifest: dict | None  # data.dir's manifest.json; None in such a dry run
    seq_len: int  # the length the data was packed at (prepare.seq_len in such a dry run)
    vocab_size: int
    preflight_notes: list[str]  # printed by `write_run_files`

    # -- 2. build_model -----------------------------------------------------------------------------------------------
    model_config: BigBirdJaConfig
    model: BigBirdJaForMaskedLM  # initialised from run.seed; the engine wraps it
    num_params: int

    # -- 3. choose_checkpoint -----------------------------------------------------------------------------------------
    writer: CheckpointWriter  # saves, verifies and prunes this run's checkpoints
    ckpt: str | None  # the checkpoint resumed from (None: a fresh run)
    forked: bool  # ckpt is another run's: this run is a fork of it
    identity: RunIdentity  # this run's id (and what it was forked from), recorded in every checkpoint
    meta: dict | None  # ckpt's checkpoint.json
    universal: bool  # ckpt is loaded through DeepSpeed's universal format (another world size or ZeRO stage)
    saved_stage: int | None  # the ZeRO stage ckpt was saved with

    # -- 4. open_data_streams (not in a dry run whose data is still to be made) ---------------------------------------
    train_data: PackedDataset  # this rank's share of the training shards, from the checkpoint's cursor
    collator: MLMCollator
    eval_data: PackedDataset | None  # this rank's share of the held-out shards (None: data.eval_shards=0)
    eval_per_rank: int  # micro-batches each rank evaluates
    eval_start: dict  # eval_data's state at its start: every evaluation reads the same samples

    # -- 5a. write_run_files ------------------------------------------------------------------------------------------
    ds_config: dict  # the DeepSpeed JSON, generated from cfg
    config_yaml: str  # the resolved config, saved beside the run and in every checkpoint

    # -- 5b. start_engine ---------------------------------------------------------------------------------------------
    engine: DeepSpeedEngine

    # -- 6. train (the watchdog: `start_watchdog`) --------------------------------------------------------------------
    reporter: Reporter  # rank 0's console lines, metrics.jsonl, TensorBoard
    sample_log: TextIO | None  # samples-rankN.jsonl (log.sample_log)
    peak: float | None  # the device's peak TFLOP/s, for MFU
    flops_per_step: float  # per device
    sigterm: bool  # set by the SIGTERM handler: save and stop after this step
    result: PretrainResult
    train_iter: Iterator[dict]  # samples of train_data
    window: LogWindow  # the steps since the last log line
    watchdog: Watchdog | None

    def __init__(self, cfg: PretrainConfig, deepspeed: ModuleType, env: DistEnv, cuda: bool, *,
                 fault_hook: FaultHook | None = None):
        self.cfg, self.deepspeed, self.env, self.cuda = cfg, deepspeed, env, cuda
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.threads = None if cuda else _cpu_threads(cfg.train.cpu_threads)
        self.plan = resolve_batch(cfg.batch, env.world_size)  # the same on every rank: all raise together
        self.out = Path(cfg.run.output_dir)
        self.state = TrainState()
        self.fault_hook = fault_hook

    def say(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def run(self, resume, dry_run: bool) -> PretrainResult | None:
        self.prepare_data(dry_run)
        self.build_model()
        self.choose_checkpoint(resume)
        if self.manifest is not None:  # a dry run whose data is still to be made has no streams to check
            self.open_data_streams()
        self.write_run_files(dry_run)
        if dry_run:
            barrier()
            return None
        self.start_engine()
        return self.train()

    # -- 1. data: build it if asked (rank 0), then every rank checks what kills large jobs -----------------------
    def prepare_data(self, dry_run: bool = False) -> None:
        cfg = self.cfg
        from ..data.fingerprint import load_tokenizer

        if dry_run and not (Path(cfg.data.dir) / "manifest.json").is_file() and cfg.prepare.inputs:
            self.plan_data()
            return
        if not dry_run:  # a dry run writes nothing
            _stop_if_problems(_on_main(self.env, lambda: ensure_data(cfg, log=self.say)), "preparing the data")
        self.tokenizer, problems = None, []
        try:
            self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        except (OSError, ValueError) as err:
            problems.append(f"tokenizer: {err}")
        report = run_preflight(cfg, rank=self.env.rank, world_size=self.env.world_size,
                               num_nodes=self.env.num_nodes, tokenizer=self.tokenizer)
        packed = report.manifest and int(report.manifest["seq_len"])
        if packed and packed != cfg.prepare.seq_len:  # the data's length is trained at: config.yaml must say it
            problems.append(f"data: prepare.seq_len={cfg.prepare.seq_len}, but {str(cfg.data.dir)!r} was packed at "
                            f"{packed} tokens a sequence (its manifest.json), the length a run trains at. Set "
                            f"--prepare.seq_len={packed}, or pack the data at {cfg.prepare.seq_len} into another "
                            f"data.dir (`bigbird-ja prepare --seq-len {cfg.prepare.seq_len}`)")
        _stop_if_problems(problems + report.problems, "preflight")
        for warning in report.warnings:
            self.say(f"warning: {warning}")
        self.preflight_notes = report.notes
        self.manifest = report.manifest
        self.seq_len = int(self.manifest["seq_len"])
        self.vocab_size = len(self.tokenizer)

    def plan_data(self) -> None:
        """--dry-run when data.dir is still to be made from prepare.inputs: nothing is trained or written; the model
        is sized from the prepare section and the checks that need the data are left to the real run."""
        from ..data.fingerprint import load_tokenizer

        cfg, env = self.cfg, self.env
        tokenizer_dir = Path(cfg.data.tokenizer)
        self.tokenizer, self.manifest, self.seq_len = None, None, cfg.prepare.seq_len
        if _holds_tokenizer(tokenizer_dir):
            self.tokenizer = load_tokenizer(tokenizer_dir)
            self.vocab_size = len(self.tokenizer)
            plan = f"tokenise {cfg.prepare.inputs} with {str(tokenizer_dir)!r}"
        elif cfg.model.init_from:  # a warm start trains no tokenizer (`ensure_data`)
            raise ConfigError(f"data.tokenizer={str(tokenizer_dir)!r} holds no tokenizer, and a warm start trains "
                              f"none: pass --data.tokenizer={cfg.model.init_from}")
        else:  # an upper bound: the tokenizer trainer shrinks the vocabulary to what the corpus supports
            self.vocab_size = cfg.prepare.tokenizer_vocab_size
            plan = (f"train a tokenizer (at most {self.vocab_size:,} pieces) into {str(tokenizer_dir)!r} and "
                    f"tokenise {cfg.prepare.inputs}")
        needed = estimate_open_files(cfg, env.world_size)
        soft, hard, problem = raise_open_file_limit(needed, cfg.preflight.raise_open_file_limit, env.world_size)
        _stop_if_problems([problem] if problem else [], "preflight")
        self.preflight_notes = [
            f"open files: limit {soft} (hard {hard}), estimated need {needed}",
            f"dry run: {str(cfg.data.dir)!r} does not exist; a real run would first {plan} into "
            f"{cfg.prepare.seq_len}-token sequences there. The data checks (shards, tokenizer fingerprint, held-out "
            f"samples) run then"]

    # -- 2. model, and the disk it will need ----------------------------------------------------------------------
    def build_model(self) -> None:
        from ..modeling import BigBirdJaForMaskedLM

        cfg = self.cfg
        self.model_config = resolve_model_config(cfg, self.vocab_size, self.seq_len)
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        if cfg.model.init_from:
            self.model = BigBirdJaForMaskedLM.from_pretrained(cfg.model.init_from, config=self.model_config)
        else:
            self.model = BigBirdJaForMaskedLM(self.model_config)
        if cfg.train.activation_checkpointing:
            self.model.activation_checkpointing_enable()
        self.num_params = sum(p.numel() for p in self.model.parameters())
        if cfg.preflight.check_disk:
            problem, _ = check_checkpoint_disk(cfg, self.num_params)
            _stop_if_problems([problem] if problem else [], "preflight")
        from .preflight import check_offload_host_memory  # offload that cannot fit host memory: refused now
        problem = check_offload_host_memory(cfg, self.env.world_size, self.env.num_nodes, self.num_params)
        _stop_if_problems([problem] if problem else [], "preflight")

    # -- 3. what to resume from (rank 0 decides, everyone follows) ------------------------------------------------
    def choose_checkpoint(self, resume) -> None:
        from ..common.distributed import all_gather_object

        cfg, env = self.cfg, self.env
        root = cfg.checkpoint_dir

        def warn(text: str) -> None:  # skipped checkpoints, and one written that fails its read-back
            self.say(f"warning: {text}")

        self.writer = CheckpointWriter(root, cfg.checkpoint.keep_last, env.rank, barrier, gather=all_gather_object,
                                       log=warn)
        chosen = []

        def choose():
            # Rank 0 verifies (sizes, every file's sha256, every rank's rng file) before any engine exists: a damaged
            # checkpoint is skipped for the next older one, never half-loaded; none usable is an error, not step 0.
            decided = choose_resume(resume, root, log=warn)
            if decided.path is None and resume in (None, "none") and list_checkpoints(root):
                raise ValueError(f"{str(root)!r} already holds checkpoints ({list_checkpoints(root)[-1].name} is "
                                 f"the newest): pass --resume auto to continue that run, or set run.output_dir / "
                                 f"checkpoint.dir to a new folder")
            start = read_meta(decided.path)["step"] if decided.path else 0

            def saves_at(step: int) -> bool:  # whether this run writes a checkpoint of `step` (SIGTERM aside)
                return start < step <= cfg.train.max_steps and (step == cfg.train.max_steps or
                                                                self._due(cfg.checkpoint.every_steps, step))

            # refused now rather than after the steps before it: the writer never overwrites another run's folder
            blocking = foreign_in_the_way(root, decided.identity, saves_at)
            if blocking:
                raise ValueError(
                    f"this run (run {decided.identity.run_id}) would save its checkpoints over step folders in "
                    f"{str(root)!r} that are not its own:\n" + "\n".join(f"    {name}: {why}" for name, why in blocking)
                    + f"\nThey are left as they are: move them out of {str(root)!r}, or stop this run before them "
                    f"(train.max_steps), then start again")
            chosen.append((str(decided.path) if decided.path else None, decided.identity.to_dict(), decided.forked))

        problems = []
        if env.is_main:
            try:
                choose()
            except (OSError, ValueError) as err:
                problems.append(str(err))
        _stop_if_problems(problems, "resume")
        self.ckpt, identity, self.forked = broadcast_object(chosen[0] if chosen else None)
        self.identity = self.writer.identity = RunIdentity.from_dict(identity)
        self.meta = read_meta(Path(self.ckpt)) if self.ckpt else None
        self.universal = False
        self.saved_stage = None
        if self.meta is None:
            return
        self.saved_stage = int(self.meta["trainer"]["config"]["zero"]["stage"])
        from ..configuration import resolve_length_fields

        # a checkpoint saved before config dicts held the length-defined fields resolved: read it as it computed
        saved = resolve_length_fields(self.meta["trainer"]["model_config"])
        current = json.loads(json.dumps(self.model_config.to_dict()))  # as JSON stored it
        diffs = _model_config_differences(saved, current)
        if diffs:
            raise ConfigError(f"--resume {self.ckpt}: the model differs from the checkpoint's ({'; '.join(diffs)})")
        if self.meta["world_size"] != env.world_size or self.saved_stage != cfg.zero.stage:
            if self.saved_stage == 0 and cfg.zero.stage == 0:
                pass  # the optimizer state is whole in the module file: loads at any world size
            elif self.saved_stage == 0 or cfg.zero.stage == 0:
                raise ConfigError(f"--resume {self.ckpt}: saved with zero.stage={self.saved_stage}, now zero.stage="
                                  f"{cfg.zero.stage}; DeepSpeed cannot move optimizer state between ZeRO and "
                                  f"non-ZeRO layouts. Resume with zero.stage={self.saved_stage}")
            else:
                self.universal = True

    # -- 4. data streams -----------------------------------------------------------------------------------------
    def open_data_streams(self) -> None:
        from ..data import MLMCollator, PackedDataset

        cfg, env, plan = self.cfg, self.env, self.plan
        n_shards = len(self.manifest["shards"])
        n_eval = cfg.data.eval_shards
        train_shards = list(range(n_shards - n_eval)) if n_eval else None
        self.train_data = PackedDataset(cfg.data.dir, seed=cfg.data.shuffle_seed, rank=env.rank,
                                        world_size=env.world_size, shuffle=True,
                                        max_open_shards=cfg.data.max_open_shards, shards=train_shards)
        if self.meta is not None:
            self.train_data.load_state_dict(self.meta["trainer"]["data"])  # the cursor: global samples consumed
        self.collator = MLMCollator.from_tokenizer(self.tokenizer, options=cfg.masking.options(),
                                                   seed=cfg.masking.seed)
        self.eval_data, self.eval_per_rank = None, 0
        if not n_eval:
            return
        self.eval_data = PackedDataset(cfg.data.dir, rank=env.rank, world_size=env.world_size, shuffle=False,
                                       num_epochs=1, drop_last=True, max_open_shards=cfg.data.max_open_shards,
                                       shards=list(range(n_shards - n_eval, n_shards)))
        # the first eval.samples of the held-out stream, whatever the world size (rounded down to whole batches)
        per_round = env.world_size * plan.micro_batch_size
        self.eval_per_rank = min(cfg.eval.samples, self.eval_data.num_samples) // per_round
        if self.eval_per_rank == 0:
            raise ConfigError(f"eval.samples={cfg.eval.samples} (the held-out shards hold "
                              f"{self.eval_data.num_samples}) is less than one micro-batch ({plan.micro_batch_size}) "
                              f"per rank x {env.world_size} ranks = {per_round}; raise eval.samples, hold out more "
                              f"shards (data.eval_shards) or set data.eval_shards=0")
        self.eval_start = self.eval_data.state_dict()

    # -- 5a. the resolved config, the DeepSpeed JSON and the model config: printed, and saved beside the run --------
    def write_run_files(self, dry_run: bool) -> None:
        cfg, env, plan = self.cfg, self.env, self.plan
        self.ds_config = deepspeed_config(cfg, plan, cuda=self.cuda, load_universal=self.universal)
        self.config_yaml = cfg.to_yaml()
        if not env.is_main:
            return
        self.say(f"resolved config ({cfg.run.name}):\n{self.config_yaml}")
        device_text = torch.cuda.get_device_name() if self.cuda else f"CPU, {self.threads} thread(s) each"
        self.say(f"world: {env.world_size} process(es) on {env.num_nodes} node(s) ({device_text}), {env.backend}; "
                 f"batch: {plan.micro_batch_size} x {plan.grad_accum_steps} accumulation x {env.world_size} = "
                 f"{plan.global_batch_size} sequences of {self.seq_len} tokens; model: {self.num_params / 1e6:,.1f} "
                 f"M parameters")
        for note in self.preflight_notes:
            self.say(f"preflight: {note}")
        if dry_run:
            self.say("deepspeed config:\n" + json.dumps(self.ds_config, indent=1))
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", self.config_yaml)
        atomic_write_text(self.out / "ds_config.json", json.dumps(self.ds_config, indent=1) + "\n")
        atomic_write_text(self.out / "model_config.json", self.model_config.to_json_string())  # as to_json_file

    # -- 5b. engine, then the checkpoint's state ---------------------------------------------------------------------
    def start_engine(self) -> None:
        cfg, env, ckpt = self.cfg, self.env, self.ckpt
        self.writer.remove_stale()
        load_dir = None
        if ckpt:
            load_dir = engine_load_dir(Path(ckpt))
            if self.universal:
                def convert():
                    self.say(f"converting {ckpt} (world size {self.meta['world_size']}, ZeRO-{self.saved_stage}) "
                             f"to DeepSpeed's universal format for world size {env.world_size}, ZeRO-"
                             f"{cfg.zero.stage}")
                    convert_to_universal(Path(ckpt))

                _stop_if_problems(_on_main(env, convert), "checkpoint conversion")
                load_dir = universal_dir(Path(ckpt))
        self.engine, _, _, _ = self.deepspeed.initialize(
            model=self.model, model_parameters=parameter_groups(self.model, cfg.optim.weight_decay),
            config=self.ds_config)
        if not ckpt:
            seed_everything(rank_seed(cfg.run.seed, env.rank))  # dropout differs between ranks
            return
        # The files were verified before the engine was built (choose_checkpoint), so a failure here is not damage
        # on disk but a checkpoint this run cannot take (DeepSpeed version, settings); the engine may be partly
        # loaded by then, so every rank stops instead of trying an older checkpoint in it.
        problems, rng = [], None
        try:
            path, _ = self.engine.load_checkpoint(str(load_dir), tag=ENGINE_TAG, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint to load in {load_dir}")
            rng = load_rng(Path(ckpt), env.rank) if self.meta["world_size"] == env.world_size else None
            if rng is not None:
                set_rng_state(rng)
        except Exception as err:  # every rank stops together, each one's message printed
            problems.append(
                f"loading {ckpt} failed ({type(err).__name__}: {str(err)[:500]}). Its files passed the checks made "
                f"before the engine was built (sizes, rng files, and every sha256 checkpoint.json lists), so this is "
                f"most likely a checkpoint this run cannot load (another DeepSpeed version, other ZeRO or model "
                f"settings) rather than damage on disk. The engine may be partly loaded, so the run stops here "
                f"rather than try an older checkpoint in it: name one with --resume <step folder>, or start afresh "
                f"in a new run.output_dir")
        _stop_if_problems(problems, "resume")
        saved = self.meta["trainer"]
        self.state = TrainState(step=saved["step"], samples=saved["samples"], tokens=saved["tokens"])
        if rng is None:  # another world size: fresh per-rank dropout streams, still a function of (seed, step, rank)
            seed_everything(rank_seed(cfg.run.seed, env.rank, self.state.step))
        self.say(f"resumed from {ckpt} at step {self.state.step} ({self.state.samples:,} samples, data cursor "
                 f"{saved['data']['global_position']:,})")
        if self.forked:
            origin = self.identity.forked_from
            of = f"run {origin['run_id']}" if origin["run_id"] else "a run written before run identities"
            self.say(f"this is a fork of {of} at step {origin['step']}: a new run, {self.identity.run_id}, whose "
                     f"checkpoints go to {str(cfg.checkpoint_dir)!r} (recorded in its run.json and checkpoints)")

    # -- 6. the loop ----------------------------------------------------------------------------------------------
    def train(self) -> PretrainResult:
        cfg, env, plan = self.cfg, self.env, self.plan
        self.reporter = Reporter(cfg, env, self.state.step)
        self.sample_log = None
        if cfg.log.sample_log:  # {"start": step} opens each session, then one record per step
            self.sample_log = open(self.out / f"samples-rank{env.rank}.jsonl", "a", encoding="utf-8")
            self.sample_log.write(json.dumps({"start": self.state.step}) + "\n")
        self.peak = cfg.log.peak_tflops or peak_tflops(torch.cuda.get_device_name() if self.cuda else None,
                                                       cfg.train.precision)
        self.flops_per_step = training_flops(self.model_config, self.seq_len, plan.micro_batch_size,
                                             plan.grad_accum_steps)
        self.reporter.record("start", step=self.state.step, resumed_from=self.ckpt, run_id=self.identity.run_id,
                             forked_from=self.identity.forked_from, world_size=env.world_size,
                             global_batch_size=plan.global_batch_size, grad_accum_steps=plan.grad_accum_steps,
                             seq_len=self.seq_len, num_params=self.num_params,
                             flops_per_step_per_device=self.flops_per_step,
                             data_cursor=self.train_data.state_dict()["global_position"])
        self.sigterm = False
        self.start_watchdog()
        previous_handler = None
        if cfg.checkpoint.save_on_sigterm:
            def on_sigterm(signum, frame):
                self.sigterm = True

            previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
        self.result = PretrainResult(output_dir=str(self.out), final_step=self.state.step, stop_reason="max_steps",
                                     resumed_from=self.ckpt, last_checkpoint=self.ckpt)
        if self.meta is not None:
            changed = apply_changed_optimizer_settings(self.engine, cfg, self.meta["trainer"]["config"])
            if changed:
                self.reporter.line(f"resumed with changed settings, in effect from step {self.state.step + 1}: "
                                   + "; ".join(changed))
                self.reporter.record("settings_changed", step=self.state.step, changes=changed)
        self.train_iter = iter(self.train_data)
        self.engine.train()
        self.window = LogWindow.new(self.device)
        saved_at = self.state.step if self.ckpt else None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        error = None
        try:
            while self.state.step < cfg.train.max_steps:
                logging_now = self._due(cfg.log.every_steps, self.state.step + 1) or \
                    self.state.step + 1 == cfg.train.max_steps
                with self.phase("step", self.state.step + 1):  # each phase timed by the watchdog
                    lr, grad_norm, finite = self.train_step(logging_now)
                    # one small all-reduce: did any rank get SIGTERM, or see a non-finite loss or gradient norm?
                    sigterm, nonfinite = any_rank_flags([self.sigterm, not finite], self.device)
                    if nonfinite:
                        self.stop_nonfinite(grad_norm)
                    if logging_now:
                        self.log(lr, grad_norm)
                last = self.state.step == cfg.train.max_steps
                if self.eval_data is not None and (self._due(cfg.eval.every_steps, self.state.step) or last):
                    with self.phase("eval", self.state.step):
                        self.evaluate()
                # checkpoint every N steps, at the end, and when any rank got SIGTERM
                sigterm = sigterm and cfg.checkpoint.save_on_sigterm
                if self._due(cfg.checkpoint.every_steps, self.state.step) or last or sigterm:
                    with self.phase("checkpoint", self.state.step):
                        self.save()
                    saved_at = self.state.step
                if sigterm:
                    self.result.stop_reason = "sigterm"
                    self.reporter.line(f"stopped by SIGTERM after step {self.state.step}; resume with --resume auto")
                    break
            if self.state.step >= cfg.train.max_steps and saved_at != self.state.step:
                self.save()
        except BaseException as err:
            self.result.stop_reason = "error"
            error = f"{type(err).__name__}: {err}"
            self.name_lost_ranks()
            named = out_of_memory_error(err, cfg, self.state.step + 1, self.seq_len, self.result.last_checkpoint)
            if named is not None:
                raise named from err
            raise
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            self.result.final_step = self.state.step
            extra = {"error": error} if error is not None else {}
            self.reporter.record("end", step=self.state.step, reason=self.result.stop_reason, **extra)
            self.reporter.close()
            if self.sample_log is not None:
                self.sample_log.close()
            self.train_data.close()
            if self.eval_data is not None:
                self.eval_data.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        barrier()
        self.engine.destroy()  # ZeRO-3's hooks and prefetch threads, before the process group goes
        self.say(f"pretrain: stopped at step {self.result.final_step} ({self.result.stop_reason}); last checkpoint "
                 f"{self.result.last_checkpoint}")
        return self.result

    @staticmethod
    def _due(every: int | None, step: int) -> bool:
        """Whether an action done every ``every`` steps (0 or None: never) falls on ``step``."""
        return bool(every) and step % every == 0

    # -- dead and hung ranks (`watchdog`) ---------------------------------------------------------------------
    def start_watchdog(self) -> None:
        """Crash stacks on, and the watchdog thread (heartbeats; hang detection) started. The folder exists for NCCL's
        flight-recorder dumps too (`distributed.flight_recorder`)."""
        enable_crash_stacks()
        folder = self.out / "watchdog"
        folder.mkdir(parents=True, exist_ok=True)

        def record_hang(message: str) -> None:  # the main thread is stuck in a collective: metrics.jsonl is free
            self.reporter.record("end", step=self.state.step, reason="hung", error=message)

        self.watchdog = Watchdog.from_config(self.cfg.watchdog, self.env, folder, on_hang=record_hang)
        if self.watchdog is not None:
            self.watchdog.start()

    def phase(self, name: str, step: int):
        """A phase of the loop the watchdog times (a no-op without one)."""
        return self.watchdog.phase(name, step) if self.watchdog is not None else contextlib.nullcontext()

    def fault_point(self, point: FaultPoint) -> None:
        """Where a rehearsal's fault may strike this rank in the step being trained; nothing without a `fault_hook`."""
        if self.fault_hook is not None:
            self.fault_hook(point, self.env.rank, self.state.step + 1)

    def name_lost_ranks(self) -> None:
        """After an error on this rank: the ranks on this host that are gone or stopped (a failed collective's own
        message names no rank)."""
        if self.watchdog is None or self.env.world_size == 1:
            return
        for line in self.watchdog.explain_failure():
            print(f"[rank {self.env.rank}] {line}", file=sys.stderr, flush=True)

    def train_step(self, logging_now: bool) -> tuple[float, float | None, bool]:
        """One optimizer step over grad_accum_steps micro-batches; returns (its learning rate, the gradient norm or
        None, whether this rank's losses and the norm were finite).

        DeepSpeed scales each loss by 1/accumulation, averages gradients over the data-parallel ranks and steps
        the optimizer on the last micro-batch."""
        plan, engine = self.plan, self.engine
        positions = []
        lr = own_norm = None
        self.fault_point("step_start")
        for micro in range(plan.grad_accum_steps):
            samples = [next(self.train_iter) for _ in range(plan.micro_batch_size)]
            if self.sample_log is not None:
                positions.extend((s["position"], s["index"]) for s in samples)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in self.collator(samples).items()}
            loss = engine(**batch).loss
            if micro == 0:
                self.fault_point("after_forward")
            engine.backward(loss)
            if micro == plan.grad_accum_steps - 1:
                lr = engine.get_lr()[0]  # the rate this optimizer step uses (the scheduler moves after it)
                if self.cfg.zero.stage == 0:  # all-reduced by now, zeroed by the step; DeepSpeed may not report one
                    own_norm = module_grad_norm(engine.module)
            engine.step()
            self.window.loss += loss.detach().double()
        self.state.advance(plan.global_batch_size, self.seq_len)
        self.window.steps += 1
        self.reporter.advance()
        if self.sample_log is not None:
            self.sample_log.write(json.dumps({"step": self.state.step, "positions": [p for p, _ in positions],
                                              "indices": [i for _, i in positions]}) + "\n")
            self.sample_log.flush()
        # DeepSpeed's norm where its optimizer computes one (ZeRO, bf16); the module's gradients otherwise
        engine_norm = engine.get_global_grad_norm()
        grad_norm = float(engine_norm) if engine_norm is not None else own_norm
        # the window's loss sum is non-finite as soon as one micro-batch loss is (the run stops at the first): one sync
        finite = bool(torch.isfinite(self.window.loss)) and (grad_norm is None or math.isfinite(grad_norm))
        return lr, grad_norm, finite

    def stop_nonfinite(self, grad_norm: float | None) -> None:
        """Stop before anything of this step is logged as progress or saved: its update may have made the weights
        non-finite. DeepSpeed has no safe way to skip a bf16 or ZeRO step (only fp16 loss scaling skips), so the
        run stops and names the last checkpoint to resume from."""
        step = self.state.step
        loss = float(self.window.loss) / max(1, self.window.steps * self.plan.grad_accum_steps)
        message = (f"step {step}: the loss (this rank's mean since the last log line: {loss}) or the gradient norm "
                   f"({grad_norm}) is not finite on at least one rank; nothing from this step was saved. The last "
                   f"checkpoint is {self.result.last_checkpoint}: resume from it with --resume auto after lowering "
                   f"optim.lr (or raising optim.warmup_steps), or check the data near this step")
        self.reporter.line(f"error: {message}")
        raise TrainingStopped(message)

    def log(self, lr: float, grad_norm: float | None) -> None:
        """The mean loss over the window, over every micro-batch of every rank, and throughput."""
        cfg, env, plan, window, step = self.cfg, self.env, self.plan, self.window, self.state.step
        loss_sum = window.loss.clone()
        if env.world_size > 1:
            torch.distributed.all_reduce(loss_sum)
        mean_loss = float(loss_sum) / (window.steps * plan.grad_accum_steps * env.world_size)
        elapsed = time.perf_counter() - window.started
        tflops = self.flops_per_step * window.steps / elapsed / 1e12
        mfu = tflops / self.peak if self.peak else None
        values = dict(step=step, loss=mean_loss, lr=lr, grad_norm=grad_norm,
                      tokens_per_s=plan.global_batch_size * self.seq_len * window.steps / elapsed,
                      samples_per_s=plan.global_batch_size * window.steps / elapsed,
                      tflops_per_device=tflops, mfu=mfu, peak_memory_gib=peak_memory_gib(self.cuda),
                      step_time_s=elapsed / window.steps, samples=self.state.samples, tokens=self.state.tokens)
        self.reporter.record("train", **values)
        self.reporter.line(
            f"step {step}/{cfg.train.max_steps} | loss {mean_loss:.4f} | lr {lr:.3e} | grad norm "
            f"{fmt(grad_norm, '.3f')} | {values['tokens_per_s']:,.0f} tok/s | {values['samples_per_s']:,.1f} "
            f"samples/s | {tflops:,.3f} TFLOP/s/device | MFU {fmt(mfu, '.1%')} | peak mem "
            f"{values['peak_memory_gib']:.2f} GiB")
        self.result.losses[step] = mean_loss
        self.window = LogWindow.new(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def evaluate(self) -> float:
        """The token-mean MLM loss over the held-out samples, the same samples and masks every time."""
        plan, env, device = self.plan, self.env, self.device
        self.eval_data.load_state_dict(self.eval_start)
        self.engine.eval()
        with torch.no_grad():
            def forward(batch):
                return self.engine(**{k: v.to(device) for k, v in batch.items()}).loss

            total, count = mlm_loss_sums(forward, eval_batches(self.eval_data, self.collator,
                                                               plan.micro_batch_size, self.eval_per_rank), device)
        self.engine.train()
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        if env.world_size > 1:
            torch.distributed.all_reduce(sums)
        eval_loss = float(sums[0] / sums[1])
        eval_samples = self.eval_per_rank * plan.micro_batch_size * env.world_size
        step = self.state.step
        self.result.eval_losses[step] = eval_loss
        self.reporter.record("eval", step=step, eval_loss=eval_loss, eval_samples=eval_samples)
        self.reporter.line(f"step {step} | eval loss {eval_loss:.4f} on {eval_samples} held-out samples")
        self.window.restart_clock()
        return eval_loss

    def save(self) -> Path:
        """A checkpoint of the engine and the trainer's state (`checkpoint.CheckpointWriter`)."""
        step = self.state.step
        trainer_state = {**vars(self.state), "data": self.train_data.state_dict(),
                         "world_size": self.env.world_size, "grad_accum_steps": self.plan.grad_accum_steps,
                         "micro_batch_size": self.plan.micro_batch_size, "config": to_dict(self.cfg),
                         "model_config": self.model_config.to_dict()}
        path = self.writer.save(self.engine, step, trainer_state=trainer_state, config_yaml=self.config_yaml,
                                model_config=self.model_config, tokenizer=self.tokenizer,
                                world_size=self.env.world_size)
        self.result.last_checkpoint = str(path)
        self.reporter.record("checkpoint", step=step, path=str(path), seconds=round(self.writer.last_seconds, 3),
                             data_cursor=trainer_state["data"]["global_position"])
        self.reporter.line(f"saved checkpoint {path.name} ({self.writer.last_seconds:.1f} s)")
        self.window.restart_clock()
        return path
