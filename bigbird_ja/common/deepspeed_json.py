"""The DeepSpeed JSON, generated from typed settings: one builder for pretraining and fine-tuning.

What both runs need the same way: the batch identity (train_batch_size = micro x accumulation x world), clipping,
precision, ZeRO, and an optimizer that never JIT-builds a DeepSpeed op: torch's AdamW through DeepSpeed's
``torch_adam`` (fused on CUDA, foreach on CPU), also under CPU offload (``zero_force_ds_cpu_optimizer: false``,
where DeepSpeedCPUAdam would be a C++ build on every rank). DeepSpeed's own step prints are silenced: the loops log.
What differs is passed in: the ZeRO section (pretraining tunes its buckets), a scheduler (pretraining uses
DeepSpeed's; fine-tuning passes its own to ``deepspeed.initialize``) and the universal-checkpoint flag.
"""

from __future__ import annotations

from typing import Any


def deepspeed_json(*, micro_batch_size: int, grad_accum_steps: int, world_size: int, grad_clip: float, bf16: bool,
                   zero: dict[str, Any], lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                   cuda: bool, scheduler: dict | None = None, load_universal: bool = False) -> dict:
    """The DeepSpeed config dict. ``zero`` is the ``zero_optimization`` section (``{"stage": 0}`` at least)."""
    offload = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    adam: dict[str, Any] = {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
                            "torch_adam": True, "adam_w_mode": True}
    if cuda and not offload:
        adam["fused"] = True
    ds: dict[str, Any] = {
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        "steps_per_print": 1 << 62,  # the loops log; DeepSpeed's own step prints would interleave with them
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if scheduler is not None:
        ds["scheduler"] = scheduler
    if offload:
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the CPU: DeepSpeedCPUAdam would be a JIT build
    return ds
