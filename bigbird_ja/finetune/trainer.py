"""The fine-tuning loop: AdamW, linear warmup then linear decay or constant, gradient accumulation, clipping.

It is the loop transformers' Trainer runs, written out so every phase is visible and nothing beyond torch is needed
(`accelerate` is not a dependency). By default one process on one device (CPU or one GPU) with torch's AdamW; with
`train.deepspeed` the same loop drives a DeepSpeed engine, data-parallel over the launcher's processes (ZeRO 0-2),
and prediction splits the features over the ranks. The batch order is a function of `train.seed` alone. Every
`log_every_steps` optimizer steps a record (step, epoch, loss over all ranks, lr, seconds) is appended to the log
file; a tqdm bar shows progress.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..common.distributed import rank_and_world_size
from ..common.optim import parameter_groups, rank_seed, seed_everything
from .config import TrainSection


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def _show_progress(setting: bool | None) -> bool:
    return sys.stderr.isatty() if setting is None else setting


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Pretraining's AdamW groups, with the relative-position embeddings left undecayed too."""
    return parameter_groups(model, weight_decay, no_decay_names=("rel_embeddings",))


def batch_order(lengths: list[int], batch_size: int, grouping: str, generator: torch.Generator) -> list[list[int]]:
    """Index batches of one epoch. "none": a random permutation cut into batches; "random" / "shortest_first":
    indices sorted by length (ties in random order) cut into batches, the batches shuffled / shortest first."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    if grouping == "none":
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    by_length = sorted(perm, key=lambda i: lengths[i])  # stable: equal lengths keep their random order
    batches = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    if grouping == "random":
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    elif grouping != "shortest_first":
        raise ValueError(f"length_grouping={grouping!r} is not one of none, random, shortest_first")
    return batches


def _input_length(feature) -> int:
    ids = feature.input_ids
    return sum(len(x) for x in ids) if ids and isinstance(ids[0], list) else len(ids)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


class _PlainStepper:
    """One process: torch AdamW, the schedule, clipping; loss / grad_accum_steps so accumulated gradients average."""

    def __init__(self, model, cfg: TrainSection, lr_factor):
        self.cfg = cfg
        self.model = model
        self.optimizer = torch.optim.AdamW(_parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)

    def forward(self, batch):
        return self.model(**batch)

    def backward(self, loss):
        (loss / self.cfg.grad_accum_steps).backward()

    def step(self):
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class _DeepSpeedStepper:
    """A DeepSpeed engine (ZeRO 0-2, torch's AdamW: nothing is JIT-built), the same schedule as a client scheduler.

    The engine divides each micro-batch loss by grad_accum_steps and averages gradients over the ranks, so one step
    averages the world x grad_accum_steps micro-batches of the global batch, as the plain loop does for its own.
    """

    def __init__(self, model, cfg: TrainSection, lr_factor, world_size: int, cuda: bool):
        import deepspeed

        from ..common.deepspeed_json import deepspeed_json

        # fp32 weights and gradients; bf16 runs under torch.autocast in the loop, so the saved model is fp32. The
        # schedule is the plain loop's, passed to initialize as a client scheduler.
        ds_config = deepspeed_json(micro_batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
                                   world_size=world_size, grad_clip=cfg.grad_clip, bf16=False,
                                   zero={"stage": cfg.zero_stage}, lr=cfg.lr, weight_decay=cfg.weight_decay, cuda=cuda)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=_parameter_groups(model, cfg.weight_decay), config=ds_config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor))

    def forward(self, batch):
        return self.engine(**batch)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()  # called once per micro-batch by DeepSpeed's contract; it steps at the boundary

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def start_deepspeed(cfg: TrainSection) -> torch.device:
    """Start the process group once (whatever launcher started us); returns this process's device."""
    import torch.distributed as dist

    device = resolve_device(cfg.device)
    if dist.is_available() and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
    from ..common.distributed import import_deepspeed, init_process_group

    import_deepspeed("train.deepspeed=true")
    env = init_process_group(device.type == "cuda")
    return torch.device("cuda", env.local_rank) if device.type == "cuda" else device


def _mean_over_ranks(total: float, count: int, world: int, device) -> float:
    if world == 1:
        return total / count
    import torch.distributed as dist

    t = torch.tensor([total, count], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


def train_model(model: torch.nn.Module, dataset: list, collate: Callable, cfg: TrainSection, *,
                log_file: str | Path | None = None, desc: str = "fine-tune") -> dict:
    """Train `model` in place on `dataset` (a list of features batched by `collate`); returns a summary dict.

    The model's forward must return an object with `.loss` when given the collated batch. An optimizer step takes
    grad_accum_steps x world size micro-batches of the epoch's batch order (a function of train.seed alone; every
    rank computes the same order and takes its share); the last step of an epoch is filled up with the epoch's
    first batches, so every rank runs the same number of micro-batches. With train.deepspeed the process group is
    started here (it stays up for prediction); only rank 0 logs and shows progress.
    """
    if not dataset:
        raise ValueError("no training features: the training data produced no usable example (see the data "
                         "report above)")
    device = resolve_device(cfg.device)
    rank, world = 0, 1
    if cfg.deepspeed:
        device = start_deepspeed(cfg)
        rank, world = rank_and_world_size()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # dropout: one process keeps train.seed (its runs are unchanged); data-parallel ranks get distinct streams. The
    # batch order has its own generator, seeded with train.seed on every rank, so the ranks agree on it.
    seed_everything(cfg.seed if world == 1 else rank_seed(cfg.seed, rank))
    model.to(device)
    order = torch.Generator().manual_seed(cfg.seed)  # the batch order: the same on every rank
    lengths = [_input_length(f) for f in dataset]
    batches_per_epoch = -(-len(dataset) // cfg.batch_size)
    micro_per_step = cfg.grad_accum_steps * world
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / micro_per_step))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def lr_factor(step: int) -> float:  # linear warmup from 0, then linear decay to 0 at total_steps (or constant)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    stepper = (_DeepSpeedStepper(model, cfg, lr_factor, world, device.type == "cuda") if cfg.deepspeed
               else _PlainStepper(model, cfg, lr_factor))
    main = rank == 0
    log = open(log_file, "a", encoding="utf-8") if log_file and main else None
    progress = None
    if main and _show_progress(cfg.progress_bar):
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True)

    model.train()
    started = time.perf_counter()
    step = micro = 0
    running, running_n, last_loss = 0.0, 0, math.nan
    samples = 0  # over all ranks
    try:
        while step < total_steps:
            batches = batch_order(lengths, cfg.batch_size, cfg.length_grouping, order)
            for first in range(0, len(batches), micro_per_step):
                group = batches[first:first + micro_per_step]
                group += [batches[i % len(batches)] for i in range(micro_per_step - len(group))]
                for indices in group[rank::world]:
                    # Forward and backward of one micro-batch of this rank.
                    batch = {k: v.to(device) for k, v in collate([dataset[i] for i in indices]).items()}
                    with _autocast(device, cfg.precision):
                        loss = stepper.forward(batch).loss
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"the training loss became {loss.item()} at step {step} (rank {rank}); "
                                           f"lower train.lr (now {cfg.lr}) or check the data")
                    stepper.backward(loss)
                    stepper.step() if cfg.deepspeed else None
                    running += loss.item()
                    running_n += 1
                micro += len(group)
                samples += sum(len(indices) for indices in group)
                if not cfg.deepspeed:
                    stepper.step()
                step += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{running / running_n:.4f}")
                if step % cfg.log_every_steps == 0 or step == total_steps:
                    last_loss = _mean_over_ranks(running, running_n, world, device)
                    record = {"step": step, "epoch": round(micro / batches_per_epoch, 3), "loss": last_loss,
                              "lr": stepper.lr(), "seconds": round(time.perf_counter() - started, 2)}
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    running, running_n = 0.0, 0
                if step >= total_steps:
                    break
    finally:
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()
    model.eval()
    return {"steps": step, "samples": samples, "epochs": round(micro / batches_per_epoch, 3),
            "final_loss": last_loss, "world_size": world, "seconds": round(time.perf_counter() - started, 2)}


@torch.no_grad()
def predict_outputs(model: torch.nn.Module, dataset: list, collate: Callable, *, batch_size: int,
                    device: str = "auto", precision: str = "fp32", progress_bar: bool | None = None,
                    desc: str = "predict") -> list[dict[str, np.ndarray]]:
    """Run `model` over `dataset` in order; one dict per batch of output arrays (logits, start_logits, ...).

    In a process group every rank runs a contiguous share of `dataset` on its full copy of the weights and every
    rank gets all outputs back, in order.
    """
    dev = resolve_device(device)
    if dev.type == "cuda" and torch.cuda.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device())
    rank, world = rank_and_world_size()
    if world > 1:
        bounds = [len(dataset) * r // world for r in range(world + 1)]
        dataset = dataset[bounds[rank]:bounds[rank + 1]]
    model.to(dev).eval()
    show = rank == 0 and _show_progress(progress_bar)
    outputs = _predict_share(model, dataset, collate, batch_size, dev, precision, show, desc)
    if world == 1:
        return outputs
    from ..common.distributed import all_gather_object

    return [out for share in all_gather_object(outputs) for out in share]


def _predict_share(model, dataset, collate, batch_size, dev, precision, show_progress, desc):
    if not dataset:
        return []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    if show_progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True)
    outputs = []
    for batch in loader:
        batch = {k: v.to(dev) for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
        with _autocast(dev, precision):
            out = model(**batch)
        outputs.append({k: v.float().cpu().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)
                        and k != "loss"} | {"attention_mask": batch["attention_mask"].cpu().numpy()})
    return outputs


__all__ = ["batch_order", "predict_outputs", "resolve_device", "seed_everything",
           "start_deepspeed", "train_model"]
