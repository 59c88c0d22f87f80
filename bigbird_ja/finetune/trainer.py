"""The fine-tuning loop: a plain PyTorch loop (AdamW, linear warmup then linear decay or constant, gradient
accumulation, clipping).

One process, one device (CPU or one GPU). It is the loop transformers' Trainer runs, written out so every phase is
visible and nothing beyond torch is needed (`accelerate` is not a dependency); DeepSpeed is not used here. The
batch order is a function of `train.seed` alone. Every `log_every_steps` optimizer steps a record (step, epoch,
loss, lr, seconds) is appended to the log file; a tqdm bar shows progress.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import TrainSection


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _show_progress(setting: bool | None) -> bool:
    return sys.stderr.isatty() if setting is None else setting


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, LayerNorm weights and the relative-position embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "LayerNorm" in name or "rel_embeddings" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def train_model(model: torch.nn.Module, dataset: list, collate: Callable, cfg: TrainSection, *,
                log_file: str | Path | None = None, desc: str = "fine-tune") -> dict:
    """Train `model` in place on `dataset` (a list of features batched by `collate`); returns a summary dict.

    The model's forward must return an object with `.loss` when given the collated batch.
    """
    if not dataset:
        raise ValueError("no training features: the training data produced no usable example (see the data "
                         "report above)")
    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    model.to(device)
    order = torch.Generator().manual_seed(cfg.seed)
    lengths = [_input_length(f) for f in dataset]
    batches_per_epoch = -(-len(dataset) // cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.grad_accum_steps))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(round(cfg.warmup_ratio * total_steps))

    optimizer = torch.optim.AdamW(_parameter_groups(model, cfg.weight_decay), lr=cfg.lr)

    def lr_factor(step: int) -> float:  # linear warmup from 0, then linear decay to 0 at total_steps (or constant)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    log = open(log_file, "a", encoding="utf-8") if log_file else None
    progress = None
    if _show_progress(cfg.progress_bar):
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True)

    model.train()
    started = time.perf_counter()
    step = micro = 0
    running, running_n, last_loss = 0.0, 0, math.nan
    samples = 0
    try:
        while step < total_steps:
            for indices in batch_order(lengths, cfg.batch_size, cfg.length_grouping, order):
                batch = collate([dataset[i] for i in indices])
                # Forward and backward of one micro-batch; the loss is scaled so accumulated gradients average.
                batch = {k: v.to(device) for k, v in batch.items()}
                with _autocast(device, cfg.precision):
                    loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise RuntimeError(f"the training loss became {loss.item()} at step {step}; lower train.lr "
                                       f"(now {cfg.lr}) or check the data")
                (loss / cfg.grad_accum_steps).backward()
                running += loss.item()
                running_n += 1
                samples += batch["input_ids"].shape[0]
                micro += 1
                if micro % cfg.grad_accum_steps and micro % batches_per_epoch:
                    continue
                # Optimizer step: clip, step, schedule, clear.
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{running / running_n:.4f}")
                if step % cfg.log_every_steps == 0 or step == total_steps:
                    last_loss = running / running_n
                    record = {"step": step, "epoch": round(micro / batches_per_epoch, 3), "loss": last_loss,
                              "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - started, 2)}
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
            "final_loss": last_loss, "seconds": round(time.perf_counter() - started, 2)}


@torch.no_grad()
def predict_outputs(model: torch.nn.Module, dataset: list, collate: Callable, *, batch_size: int,
                    device: str = "auto", precision: str = "fp32", progress_bar: bool | None = None,
                    desc: str = "predict") -> list[dict[str, np.ndarray]]:
    """Run `model` over `dataset` in order; one dict per batch of output arrays (logits, start_logits, ...)."""
    dev = resolve_device(device)
    model.to(dev).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    if _show_progress(progress_bar):
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


__all__ = ["batch_order", "predict_outputs", "resolve_device", "seed_everything", "train_model"]
