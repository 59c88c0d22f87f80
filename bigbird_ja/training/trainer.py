"""`pretrain`: masked-language-model pretraining of BigBird-ja on DeepSpeed, resumable exactly.

The same function runs as one process, under the `deepspeed` launcher, `torchrun`, `mpirun` or `srun` (see
`distributed`). The phases, in the order of the comments in `_pretrain`:

0. Process group (gloo on CPU, NCCL on CUDA). No DeepSpeed op is JIT-compiled: the optimizer is torch's AdamW
   (fused on CUDA), and on CPU DeepSpeed's shared-memory all-reduce op (a C++ build at start, used only for
   inference) is switched off unless it was installed prebuilt.
1. Data: if data.dir does not exist and prepare.inputs are given, rank 0 trains a tokenizer (if needed) and runs
   `prepare`; every rank then runs the preflight checks (`preflight`). Any failure on any rank stops every rank.
2. Model: the preset + overrides, vocab_size from the tokenizer, initialised from run.seed on every rank.
3. Resume: `--resume auto` takes the newest complete checkpoint; at another world size (or ZeRO stage) it will be
   converted to DeepSpeed's universal format.
4. Data streams: training reads all but the last data.eval_shards shards from the checkpoint's cursor; evaluation
   reads the first eval.samples of the held-out shards.
5. Engine (DeepSpeed JSON from the config), then the checkpoint's weights, optimizer, scheduler and RNG states.
6. The loop: accumulation, logging, evaluation, checkpoints every N steps, at the end and on SIGTERM.

The trainer's state (step, samples, tokens, data cursor, each rank's RNG) is saved in every checkpoint and
restored on resume: a run killed after its checkpoint at step k and resumed repeats steps k+1.. exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (
    ENGINE_TAG, CheckpointWriter, convert_to_universal, engine_load_dir, list_checkpoints, load_rng, read_meta,
    resolve_resume, set_rng_state, universal_dir,
)
from .config import ConfigError, PretrainConfig, deepspeed_config, load_yaml_text, resolve_batch, to_dict
from .distributed import DistEnv, agree, any_rank, barrier, broadcast_object, init_process_group
from .flops import peak_tflops, training_flops
from .preflight import PreflightError, checkpoint_bytes, check_free_disk, existing_checkpoints, format_problems, \
    run_preflight

BUNDLED_CORPUS = "bundled:ja_sample"
INSTALL_HINT = "pip install 'bigbird-ja[train]'"


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


# ----------------------------------------------------------------------------------------------------------------
# Set-up helpers


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(f"bigbird-ja pretrain needs DeepSpeed ({err}): {INSTALL_HINT}") from None
    return deepspeed


def _no_jit_ops_on_cpu() -> None:
    """On the CPU accelerator DeepSpeed builds a shared-memory all-reduce op (C++, about a minute, into a shared
    cache) when the process group starts. Training never uses it (it serves inference_all_reduce), so unless it was
    installed prebuilt it is marked incompatible, which DeepSpeed honours by not loading it."""
    import deepspeed.ops
    from deepspeed.git_version_info import installed_ops

    if not installed_ops.get("deepspeed_shm_comm", False):
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _cpu_threads(requested: int | None) -> int:
    """train.cpu_threads, else OMP_NUM_THREADS, else 1 (see TrainSection for why not all cores)."""
    threads = requested or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
    torch.set_num_threads(threads)
    return threads


def _resolve_inputs(inputs: list[str]) -> list[str]:
    from ..data import sample_corpus_path

    return [str(sample_corpus_path()) if x == BUNDLED_CORPUS else x for x in inputs]


def ensure_data(cfg: PretrainConfig, log=print) -> None:
    """Build data.tokenizer and data.dir from prepare.inputs when they do not exist (call on one process)."""
    data_dir, tok_dir = Path(cfg.data.dir), Path(cfg.data.tokenizer)
    if (data_dir / "manifest.json").is_file() or not cfg.prepare.inputs:
        return  # present, or nothing to build it from (preflight says what is missing)
    from ..data import prepare

    inputs = _resolve_inputs(cfg.prepare.inputs)
    if not (tok_dir / "tokenizer.json").is_file():
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


def build_model_config(cfg: PretrainConfig, vocab_size: int, seq_len: int):
    """The resolved BigBirdJaConfig: preset (YAML or config.json folder) + overrides + the tokenizer's vocab."""
    from ..configuration import BigBirdJaConfig

    valid = {f.name for f in dataclasses.fields(BigBirdJaConfig)}
    source = cfg.model.preset or cfg.model.init_from
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model: {str(path)!r} has no config.json")
        values = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k in valid}
    elif path.is_file():
        values = load_yaml_text(path.read_text(encoding="utf-8")) or {}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(f"model preset {path}: unknown keys {unknown}; valid keys are {sorted(valid)}")
    else:
        raise FileNotFoundError(f"model preset {str(path)!r} does not exist (presets live in configs/model/)")
    unknown = sorted(set(cfg.model.overrides) - valid)
    if unknown:
        raise ConfigError(f"model.overrides: unknown keys {unknown}; valid keys are {sorted(valid)}")
    values.update(cfg.model.overrides)
    values["vocab_size"] = vocab_size
    config = BigBirdJaConfig(**values)
    if config.max_position_embeddings < seq_len:
        raise ConfigError(f"model: max_position_embeddings={config.max_position_embeddings} is below the data's "
                          f"seq_len={seq_len}; set model.overrides.max_position_embeddings >= {seq_len} or prepare "
                          f"shorter sequences")
    return config


def parameter_groups(model, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> list[dict]:
    """AdamW groups: weight decay on matrices and embeddings, none on biases and LayerNorm weights (1-D) nor on
    parameters whose name contains one of `no_decay_names`."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = param.dim() < 2 or any(part in name for part in no_decay_names)
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _model_config_differences(saved: dict, current: dict) -> list[str]:
    ignore = {"transformers_version", "architectures", "torch_dtype", "dtype", "_name_or_path"}
    keys = sorted((set(saved) | set(current)) - ignore)
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _stop_if_problems(problems: list[str], what: str) -> None:
    by_rank = agree(problems)
    if by_rank:
        raise PreflightError(format_problems(by_rank) if what == "preflight" else
                             f"{what} failed:\n" + "\n".join(f"  [rank {r}] {m}" for r, ms in sorted(by_rank.items())
                                                            for m in ms))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


# ----------------------------------------------------------------------------------------------------------------
# Observability


class _Reporter:
    """Rank 0's outputs: console lines (through the progress bar), metrics.jsonl, TensorBoard."""

    def __init__(self, cfg: PretrainConfig, env: DistEnv, start_step: int):
        self.enabled = env.is_main
        self.bar = None
        self.tb = None
        self.metrics = None
        if not self.enabled:
            return
        out = Path(cfg.run.output_dir)
        self.metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
        show = sys.stderr.isatty() if cfg.log.progress_bar is None else cfg.log.progress_bar
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc=cfg.run.name, unit="step",
                            dynamic_ncols=True)
        if cfg.log.tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
            except ImportError:
                if cfg.log.tensorboard:
                    raise ImportError("log.tensorboard=true but tensorboard is not installed: pip install "
                                      "tensorboard (or log.tensorboard=null: use it when installed)") from None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def record(self, event: str, **values) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"event": event, **values}, sort_keys=False) + "\n")
        self.metrics.flush()
        if self.tb is not None and event in ("train", "eval"):
            step = values["step"]
            for key, value in values.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"{event}/{key}", value, step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.metrics is not None:
            self.metrics.close()


def _peak_memory_gib(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def _grad_norm(module) -> float:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


# ----------------------------------------------------------------------------------------------------------------
# pretrain


def pretrain(cfg: PretrainConfig, *, resume: str | None = None, dry_run: bool = False) -> PretrainResult | None:
    """Run (or continue) the pretraining described by ``cfg``; see the module docstring.

    resume: None / "none" (fresh; an error if checkpoints exist), "auto" (the newest complete checkpoint, or fresh),
        or a checkpoint path.
    dry_run: stop after the preflight checks, printing the resolved config and the DeepSpeed JSON.
    """
    # -- 0. process group ---------------------------------------------------------------------------------------
    deepspeed = _import_deepspeed()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _no_jit_ops_on_cpu()
    env = init_process_group(cuda)
    try:
        return _pretrain(cfg, deepspeed, env, cuda, resume, dry_run)
    finally:  # every way out, errors included: without it the interpreter can abort at exit (ZeRO-3 threads)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _pretrain(cfg: PretrainConfig, deepspeed, env: DistEnv, cuda: bool, resume, dry_run: bool):
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    threads = None if cuda else _cpu_threads(cfg.train.cpu_threads)
    plan = resolve_batch(cfg.batch, env.world_size)  # the same on every rank: all raise together
    say = (lambda text: print(text, flush=True)) if env.is_main else (lambda text: None)

    # -- 1. data: build it if asked (rank 0), then every rank checks what kills large jobs --------------------------
    problems = []
    if env.is_main:
        try:
            ensure_data(cfg, log=say)
        except Exception as err:  # reported by every rank below
            problems.append(f"{type(err).__name__}: {err}")
    _stop_if_problems(problems, "preparing the data")

    from ..data import MLMCollator, PackedDataset
    from ..data.fingerprint import load_tokenizer

    tokenizer, problems = None, []
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError) as err:
        problems.append(f"tokenizer: {err}")
    report = run_preflight(cfg, rank=env.rank, world_size=env.world_size, num_nodes=env.num_nodes,
                           tokenizer=tokenizer)
    _stop_if_problems(problems + report.problems, "preflight")
    for warning in report.warnings:
        say(f"warning: {warning}")
    manifest = report.manifest
    seq_len = int(manifest["seq_len"])

    # -- 2. model --------------------------------------------------------------------------------------------------
    from ..modeling import BigBirdJaForMaskedLM

    model_config = build_model_config(cfg, len(tokenizer), seq_len)
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    if cfg.model.init_from:
        model = BigBirdJaForMaskedLM.from_pretrained(cfg.model.init_from, config=model_config)
    else:
        model = BigBirdJaForMaskedLM(model_config)
    if cfg.train.activation_checkpointing:
        model.activation_checkpointing_enable()
    num_params = sum(p.numel() for p in model.parameters())
    if cfg.preflight.check_disk:
        root = cfg.checkpoint_dir
        needed = max(0, cfg.checkpoint.keep_last + 1 - existing_checkpoints(root)) * checkpoint_bytes(num_params, cfg)
        problem = check_free_disk(root, needed)
        _stop_if_problems([problem] if problem else [], "preflight")

    # -- 3. what to resume from (rank 0 decides, everyone follows) ------------------------------------------------
    root = cfg.checkpoint_dir
    writer = CheckpointWriter(root, cfg.checkpoint.keep_last, env.rank, barrier)
    problems, ckpt = [], None
    if env.is_main:
        try:
            ckpt = resolve_resume(resume, root)
            if ckpt is None and resume in (None, "none") and list_checkpoints(root):
                raise ValueError(f"{str(root)!r} already holds checkpoints ({list_checkpoints(root)[-1].name} is "
                                 f"the newest): pass --resume auto to continue that run, or set run.output_dir / "
                                 f"checkpoint.dir to a new folder")
        except (OSError, ValueError) as err:
            problems.append(str(err))
    _stop_if_problems(problems, "resume")
    ckpt = broadcast_object(str(ckpt) if ckpt else None)
    meta = read_meta(Path(ckpt)) if ckpt else None
    universal = False
    if meta is not None:
        saved_cfg = meta["trainer"]["config"]
        saved_stage = int(saved_cfg["zero"]["stage"])
        diffs = _model_config_differences(meta["trainer"]["model_config"],
                                          json.loads(json.dumps(model_config.to_dict())))  # as JSON stored it
        if diffs:
            raise ConfigError(f"--resume {ckpt}: the model differs from the checkpoint's ({'; '.join(diffs)})")
        if meta["world_size"] != env.world_size or saved_stage != cfg.zero.stage:
            if saved_stage == 0 and cfg.zero.stage == 0:
                pass  # the optimizer state is whole in the module file: loads at any world size
            elif saved_stage == 0 or cfg.zero.stage == 0:
                raise ConfigError(f"--resume {ckpt}: saved with zero.stage={saved_stage}, now zero.stage="
                                  f"{cfg.zero.stage}; DeepSpeed cannot move optimizer state between ZeRO and "
                                  f"non-ZeRO layouts. Resume with zero.stage={saved_stage}")
            else:
                universal = True

    # -- 4. data streams -----------------------------------------------------------------------------------------
    n_shards = len(manifest["shards"])
    n_eval = cfg.data.eval_shards
    train_shards = list(range(n_shards - n_eval)) if n_eval else None
    train_data = PackedDataset(cfg.data.dir, seed=cfg.data.shuffle_seed, rank=env.rank, world_size=env.world_size,
                               shuffle=True, max_open_shards=cfg.data.max_open_shards, shards=train_shards)
    if meta is not None:
        train_data.load_state_dict(meta["trainer"]["data"])  # the cursor: samples of the global stream consumed
    collator = MLMCollator.from_tokenizer(tokenizer, options=cfg.masking.options(), seed=cfg.masking.seed)
    eval_data, eval_per_rank = None, 0
    if n_eval:
        eval_data = PackedDataset(cfg.data.dir, rank=env.rank, world_size=env.world_size, shuffle=False,
                                  num_epochs=1, drop_last=True, max_open_shards=cfg.data.max_open_shards,
                                  shards=list(range(n_shards - n_eval, n_shards)))
        # the first eval.samples of the held-out stream, whatever the world size (rounded down to whole batches)
        per_round = env.world_size * plan.micro_batch_size
        eval_per_rank = min(cfg.eval.samples, eval_data.num_samples) // per_round
        if eval_per_rank == 0:
            raise ConfigError(f"eval.samples={cfg.eval.samples} (the held-out shards hold {eval_data.num_samples}) "
                              f"is less than one micro-batch ({plan.micro_batch_size}) per rank x {env.world_size} "
                              f"ranks = {per_round}; raise eval.samples, hold out more shards (data.eval_shards) or "
                              f"set data.eval_shards=0")

    ds_config = deepspeed_config(cfg, plan, cuda=cuda, load_universal=universal)
    config_yaml = cfg.to_yaml()
    if env.is_main:
        out = Path(cfg.run.output_dir)
        say(f"resolved config ({cfg.run.name}):\n{config_yaml}")
        device_text = torch.cuda.get_device_name() if cuda else f"CPU, {threads} thread(s) each"
        say(f"world: {env.world_size} process(es) on {env.num_nodes} node(s) ({device_text}), {env.backend}; batch: "
            f"{plan.micro_batch_size} x {plan.grad_accum_steps} accumulation x {env.world_size} = "
            f"{plan.global_batch_size} sequences of {seq_len} tokens; model: {num_params / 1e6:,.1f} M parameters")
        for note in report.notes:
            say(f"preflight: {note}")
        if dry_run:
            say("deepspeed config:\n" + json.dumps(ds_config, indent=1))
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
            (out / "ds_config.json").write_text(json.dumps(ds_config, indent=1) + "\n", encoding="utf-8")
            model_config.to_json_file(str(out / "model_config.json"))
    if dry_run:
        barrier()
        return None

    # -- 5. engine, then the checkpoint's state ---------------------------------------------------------------------
    writer.remove_stale()
    load_dir = None
    if ckpt:
        load_dir = engine_load_dir(Path(ckpt))
        if universal:
            problems = []
            if env.is_main:
                try:
                    say(f"converting {ckpt} (world size {meta['world_size']}, ZeRO-{saved_stage}) to DeepSpeed's "
                        f"universal format for world size {env.world_size}, ZeRO-{cfg.zero.stage}")
                    convert_to_universal(Path(ckpt))
                except Exception as err:
                    problems.append(f"{type(err).__name__}: {err}")
            _stop_if_problems(problems, "checkpoint conversion")
            load_dir = universal_dir(Path(ckpt))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(
        model, cfg.optim.weight_decay), config=ds_config)

    step, samples, tokens = 0, 0, 0
    if ckpt:
        path, _ = engine.load_checkpoint(str(load_dir), tag=ENGINE_TAG, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {load_dir}")
        trainer = meta["trainer"]
        step, samples, tokens = trainer["step"], trainer["samples"], trainer["tokens"]
        rng = load_rng(Path(ckpt), env.rank) if meta["world_size"] == env.world_size else None
        if rng is not None:
            set_rng_state(rng)
        else:  # another world size: fresh per-rank dropout streams, still a function of (seed, step, rank)
            seed_everything(cfg.run.seed * 1_000_003 + step * 7919 + env.rank + 1)
        say(f"resumed from {ckpt} at step {step} ({samples:,} samples, data cursor "
            f"{trainer['data']['global_position']:,})")
    else:
        seed_everything(cfg.run.seed * 1_000_003 + env.rank + 1)  # dropout differs between ranks

    eval_start = eval_data.state_dict() if eval_data is not None else None

    def evaluate() -> tuple[float, int]:
        eval_data.load_state_dict(eval_start)  # the same held-out samples (and masks) every time
        engine.eval()
        with torch.no_grad():
            def forward(batch):
                batch = {k: v.to(device) for k, v in batch.items()}
                return engine(**batch).loss

            total, count = mlm_loss_sums(forward, eval_batches(eval_data, collator, plan.micro_batch_size,
                                                               eval_per_rank), device)
        engine.train()
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        if env.world_size > 1:
            torch.distributed.all_reduce(sums)
        return float(sums[0] / sums[1]), eval_per_rank * plan.micro_batch_size * env.world_size

    # -- 6. the loop ----------------------------------------------------------------------------------------------
    out = Path(cfg.run.output_dir)
    reporter = _Reporter(cfg, env, step)
    sample_log = None
    if cfg.log.sample_log:  # {"start": step} opens each session, then one record per step
        sample_log = open(out / f"samples-rank{env.rank}.jsonl", "a", encoding="utf-8")
        sample_log.write(json.dumps({"start": step}) + "\n")
    peak = cfg.log.peak_tflops or peak_tflops(torch.cuda.get_device_name() if cuda else None, cfg.train.precision)
    flops_per_step = training_flops(model_config, seq_len, plan.micro_batch_size, plan.grad_accum_steps)
    reporter.record("start", step=step, resumed_from=ckpt, world_size=env.world_size,
                    global_batch_size=plan.global_batch_size, grad_accum_steps=plan.grad_accum_steps,
                    seq_len=seq_len, num_params=num_params, flops_per_step_per_device=flops_per_step,
                    data_cursor=train_data.state_dict()["global_position"])
    stop = {"sigterm": False}
    previous_handler = None
    if cfg.checkpoint.save_on_sigterm:
        def on_sigterm(signum, frame):
            stop["sigterm"] = True

        previous_handler = signal.signal(signal.SIGTERM, on_sigterm)

    result = PretrainResult(output_dir=str(out), final_step=step, stop_reason="max_steps", resumed_from=ckpt,
                            last_checkpoint=ckpt)

    def save(step_now: int) -> None:
        trainer_state = {"step": step_now, "samples": samples, "tokens": tokens, "data": train_data.state_dict(),
                         "world_size": env.world_size, "grad_accum_steps": plan.grad_accum_steps,
                         "micro_batch_size": plan.micro_batch_size, "config": to_dict(cfg),
                         "model_config": model_config.to_dict()}
        path = writer.save(engine, step_now, trainer_state=trainer_state, config_yaml=config_yaml,
                           model_config=model_config, tokenizer=tokenizer, world_size=env.world_size)
        result.last_checkpoint = str(path)
        reporter.record("checkpoint", step=step_now, path=str(path), seconds=round(writer.last_seconds, 3),
                        data_cursor=trainer_state["data"]["global_position"])
        reporter.line(f"saved checkpoint {path.name} ({writer.last_seconds:.1f} s)")

    train_iter = iter(train_data)
    engine.train()
    window = {"loss": torch.zeros((), dtype=torch.float64, device=device), "steps": 0,
              "start": time.perf_counter()}
    saved_at = step if ckpt else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        while step < cfg.train.max_steps:
            # forward / backward over grad_accum_steps micro-batches; DeepSpeed scales each loss by 1/accum,
            # averages gradients over the data-parallel ranks and steps the optimizer on the last micro-batch.
            step_positions = []
            lr = grad_norm = None
            logging_now = (step + 1) % cfg.log.every_steps == 0 or step + 1 == cfg.train.max_steps
            for micro in range(plan.grad_accum_steps):
                samples_now = [next(train_iter) for _ in range(plan.micro_batch_size)]
                if sample_log is not None:
                    step_positions.extend((s["position"], s["index"]) for s in samples_now)
                batch = {k: v.to(device, non_blocking=True) for k, v in collator(samples_now).items()}
                loss = engine(**batch).loss
                engine.backward(loss)
                if micro == plan.grad_accum_steps - 1:
                    lr = engine.get_lr()[0]  # the rate this optimizer step uses (the scheduler moves after it)
                    if cfg.zero.stage == 0 and logging_now:
                        # DeepSpeed reports no norm without ZeRO; the gradients are all-reduced by now
                        grad_norm = _grad_norm(engine.module)
                engine.step()
                window["loss"] += loss.detach().double()
            step += 1
            samples += plan.global_batch_size
            tokens += plan.global_batch_size * seq_len
            window["steps"] += 1
            reporter.advance()
            if sample_log is not None:
                sample_log.write(json.dumps({"step": step, "positions": [p for p, _ in step_positions],
                                             "indices": [i for _, i in step_positions]}) + "\n")
                sample_log.flush()

            # log: the mean loss over the window, over every micro-batch of every rank
            if step % cfg.log.every_steps == 0 or step == cfg.train.max_steps:
                loss_sum = window["loss"].clone()
                if env.world_size > 1:
                    torch.distributed.all_reduce(loss_sum)
                mean_loss = float(loss_sum) / (window["steps"] * plan.grad_accum_steps * env.world_size)
                elapsed = time.perf_counter() - window["start"]
                if grad_norm is None and engine.get_global_grad_norm() is not None:
                    grad_norm = float(engine.get_global_grad_norm())
                tflops = flops_per_step * window["steps"] / elapsed / 1e12
                mfu = tflops / peak if peak else None
                values = dict(step=step, loss=mean_loss, lr=lr, grad_norm=grad_norm,
                              tokens_per_s=plan.global_batch_size * seq_len * window["steps"] / elapsed,
                              samples_per_s=plan.global_batch_size * window["steps"] / elapsed,
                              tflops_per_device=tflops, mfu=mfu, peak_memory_gib=_peak_memory_gib(cuda),
                              step_time_s=elapsed / window["steps"], samples=samples, tokens=tokens)
                reporter.record("train", **values)
                reporter.line(
                    f"step {step}/{cfg.train.max_steps} | loss {mean_loss:.4f} | lr {lr:.3e} | grad norm "
                    f"{_fmt(grad_norm, '.3f')} | {values['tokens_per_s']:,.0f} tok/s | "
                    f"{values['samples_per_s']:,.1f} samples/s | {tflops:,.3f} TFLOP/s/device | MFU "
                    f"{_fmt(mfu, '.1%')} | peak mem {values['peak_memory_gib']:.2f} GiB")
                result.losses[step] = mean_loss
                window = {"loss": torch.zeros((), dtype=torch.float64, device=device), "steps": 0,
                          "start": time.perf_counter()}
                if cuda:
                    torch.cuda.reset_peak_memory_stats()

            # evaluate on the held-out shards
            last = step == cfg.train.max_steps
            if eval_data is not None and ((cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or last):
                eval_loss, eval_samples = evaluate()
                result.eval_losses[step] = eval_loss
                reporter.record("eval", step=step, eval_loss=eval_loss, eval_samples=eval_samples)
                reporter.line(f"step {step} | eval loss {eval_loss:.4f} on {eval_samples} held-out samples")
                window["start"] = time.perf_counter()  # evaluation time is not training throughput

            # checkpoint every N steps, at the end, and when any rank got SIGTERM
            sigterm = any_rank(stop["sigterm"], device) if cfg.checkpoint.save_on_sigterm else False
            every = cfg.checkpoint.every_steps
            if (every and step % every == 0) or last or sigterm:
                save(step)
                saved_at = step
                window["start"] = time.perf_counter()
            if sigterm:
                result.stop_reason = "sigterm"
                reporter.line(f"stopped by SIGTERM after step {step}; resume with --resume auto")
                break
        if step >= cfg.train.max_steps and saved_at != step:
            save(step)
    finally:
        result.final_step = step
        reporter.record("end", step=step, reason=result.stop_reason)
        reporter.close()
        if sample_log is not None:
            sample_log.close()
        train_data.close()
        if eval_data is not None:
            eval_data.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    barrier()
    engine.destroy()  # ZeRO-3's hooks and prefetch threads, before the process group goes
    say(f"pretrain: stopped at step {result.final_step} ({result.stop_reason}); last checkpoint "
        f"{result.last_checkpoint}")
    return result
