"""What rank 0 shows and keeps of a pretraining run: console lines (through the progress bar), metrics.jsonl,
TensorBoard when installed; peak memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..common.distributed import DistEnv
from .config import PretrainConfig


class Reporter:
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


def peak_memory_gib(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)
