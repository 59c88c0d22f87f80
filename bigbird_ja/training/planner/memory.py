"""The ZeRO memory model: bytes per GPU of weights, gradients, optimizer states, DeepSpeed's buffers and activations,
and the peak they make together.

Model states (per GPU): what DeepSpeed 0.19 keeps for this project's settings (AdamW, two fp32 moments; "bf16" =
bf16 weights and activations with fp32 master weights, "fp32" = everything fp32). Replicated terms are x P, sharded
ones x P / n (the ZeRO paper's Psi and N_d):

    bf16   stage 0  params 2      grads 2 + 4        optimizer 12/n   (DeepSpeed's BF16_Optimizer: bf16 grads, a full
                                                                       fp32 accumulation buffer; it shards the fp32
                                                                       master + moments over the ranks, like ZeRO-1)
           stage 1  params 2      grads 2 + 4/n      optimizer 12/n   (bf16 grads stay whole; the fp32 ones sharded)
           stage 2  params 2      grads (2 + 4)/n    optimizer 12/n   = 2 + 18/n: DeepSpeed's own estimate
           stage 3  params 2/n + 4 x largest layer / P   grads 4/n   optimizer 12/n   = DeepSpeed's estimate
                    (bf16 gradients are reduce-scattered straight into the fp32 partition: 18/n in all)
    fp32   stage 0  params 4      grads 4            optimizer 8      (torch's AdamW on the module's own weights)
           stage 1  params 4      grads 4 + 4/n      optimizer (4 + 8)/n   (ZeRO keeps an fp32 partition copy)
           stage 2  params 4      grads 4/n          optimizer (4 + 8)/n
           stage 3  params 4/n + 4 x largest layer / P   grads 4/n   optimizer 8/n   (the partition is the master)

The ZeRO paper (Rajbhandari et al. 2020, sec. 5) counts 2 + 2 + 12 = 16 bytes for stage 0, (2 + 2) + 12/n for
stage 1, 2 + (2 + 12)/n for stage 2 and 16/n for stage 3 with fp16; DeepSpeed's estimators
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`) add the fp32 gradient partition
(4/n) and, for stage 3, the largest layer gathered in 4 bytes; the stage-2 and stage-3 rows equal them (a test).

DeepSpeed buffers (per GPU): stages 1-2: gradient reduction buckets of reduce_bucket_size elements, two with
overlap_comm (double buffering), in the gradient dtype (ZeRO-1 stages the fp32 accumulator: 4 bytes), made with
torch.empty at the first gradient of each step (`stage_1_and_2.py`, setup_buckets): on a GPU the whole buckets are
allocated then, beside the activations; on a CPU (the benchmark) only the pages gradients are written into become
resident, at most P elements, after the activation peak. Stage 3: one bucket of reduce_bucket_size allocated at
initialisation (on a CPU again only as far as P gradients fill it), the gathered weights (`zero3_gathered_params`:
DeepSpeed keeps a weight gathered while it is used again within stage3_max_reuse_distance elements, default 1e9,
up to stage3_max_live_parameters: for every model below those limits, all of them from the second step on;
prefetched weights are among them) and the weights below stage3_param_persistence_threshold kept whole on every
rank. Stage 0 in fp32: the engine's flat all-reduce copy of the gradients (min(5e8, P) elements), made after the
backward.

Activations: counted by `activations.model_facts`.

Peak (`memory_breakdown`): the parts do not all peak together. The activations peak inside the backward (the
head's, or a recomputed layer's); the gradients the backward makes and the buffers made after it peak at its end:
    total = parameters + optimizer + persistent gradients (ZeRO-3's fp32 partition; bf16 ZeRO-0's fp32
            accumulator, both allocated at initialisation)
            + max(activations + buffers alive with them, the other gradients + buffers made after the backward)

Allowance (GPU): CUDA context, cuBLAS / NCCL workspaces and the caching allocator's fragmentation: 1.5 GiB + 10% of
the rest (the usual range: 0.5-1 GiB of context and workspace, 5-15% fragmentation). A setting fits when the
peak + allowance <= the device memory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import ZeroSection
from .activations import ModelFacts
from .hardware import GIB

ALLOWANCE_FIXED = 1.5 * GIB
ALLOWANCE_FRACTION = 0.10
STAGE0_ALLREDUCE_BUCKET = 500_000_000  # DeepSpeed's allreduce_bucket_size default (stage 0's flat copy)

_ZERO_SECTION = ZeroSection()


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO fields the memory and time model reads (defaults: the pretraining config's `ZeroSection`)."""

    overlap_comm: bool = _ZERO_SECTION.overlap_comm
    reduce_bucket_size: int = _ZERO_SECTION.reduce_bucket_size
    allgather_bucket_size: int = _ZERO_SECTION.allgather_bucket_size
    stage3_prefetch_bucket_size: int = _ZERO_SECTION.stage3_prefetch_bucket_size
    stage3_param_persistence_threshold: int = _ZERO_SECTION.stage3_param_persistence_threshold
    stage3_max_live_parameters: int = _ZERO_SECTION.stage3_max_live_parameters
    stage3_max_reuse_distance: int = 1_000_000_000  # DeepSpeed's default (the pretraining config leaves it)

    @classmethod
    def from_section(cls, zero) -> "ZeroSettings":
        """The fields of a pretraining config's `zero` section that this dataclass has, by name."""
        return cls(**{f.name: getattr(zero, f.name) for f in fields(cls) if hasattr(zero, f.name)})


def model_state_bytes(num_params: int, largest_layer_params: int, stage: int, world: int,
                      precision: str = "bf16") -> dict[str, float]:
    """Parameters, gradients and optimizer states per GPU (the table of the module docstring)."""
    P, n = float(num_params), float(world)
    if precision == "bf16":
        rows = {0: (2, 2 + 4, 12 / n), 1: (2, 2 + 4 / n, 12 / n), 2: (2, 6 / n, 12 / n),
                3: (2 / n + 4 * largest_layer_params / P, 4 / n, 12 / n)}
    elif precision == "fp32":
        rows = {0: (4, 4, 8), 1: (4, 4 + 4 / n, 12 / n), 2: (4, 4 / n, 12 / n),
                3: (4 / n + 4 * largest_layer_params / P, 4 / n, 8 / n)}
    else:
        raise ValueError(f"precision={precision!r}: must be 'bf16' or 'fp32'")
    params, grads, optim = rows[stage]
    return {"parameters": params * P, "gradients": grads * P, "optimizer": optim * P}


def persistent_gradient_bytes(num_params: int, stage: int, world: int, precision: str = "bf16") -> float:
    """The part of the gradient memory allocated once and kept between steps (the rest lives from the backward to
    the optimizer step): ZeRO-3's fp32 gradient partition (`stage3.py`: grad_partitions_flat_buffer, zeros at
    initialisation) and, bf16 at stage 0, BF16_Optimizer's fp32 accumulation buffer (`bf16_optimizer.py`:
    fp32_groups_gradients_flat, zeros at initialisation). The module's own .grad (set to None by zero_grad) and the
    stage 1-2 partitions (made by the reduction) are not."""
    P, n = float(num_params), float(world)
    if stage == 3:
        return 4 * P / n
    if stage == 0 and precision == "bf16":
        return 4 * P
    return 0.0


def buffer_bytes(facts: ModelFacts, stage: int, precision: str, zero: ZeroSettings,
                 device: str = "gpu") -> tuple[float, float]:
    """DeepSpeed's communication buffers per GPU (module docstring): (alive with the activations, alive only after
    the backward). ``device`` "cpu": only the pages gradients are written into are resident (an untouched
    torch.empty costs no RSS), so a bucket counts as far as the P gradients fill it."""
    P = facts.num_params
    elem = 2 if precision == "bf16" else 4
    if stage == 0:  # the engine's flat copy of the gradients for its all-reduce, made after the backward
        return 0.0, (0.0 if precision == "bf16" else float(min(STAGE0_ALLREDUCE_BUCKET, P) * 4))
    count = 2 if zero.overlap_comm and stage < 3 else 1  # stage 3 has a single bucket (stage3.py)
    buckets = count * zero.reduce_bucket_size
    buckets = min(buckets, P) if device == "cpu" else buckets
    buckets *= 4 if stage == 1 else elem  # ZeRO-1 stages the fp32 accumulator
    if stage == 3:  # the bucket is allocated at initialisation; the gathered and the persistent (small) weights
        return float(buckets + zero3_gathered_params(P, zero) * elem + facts.persistent_params * elem), 0.0
    # stages 1-2: allocated at the first gradient (setup_buckets). On a GPU that is all of it, at the activation
    # peak (the MLM head's backward); on a CPU the pages fill with the gradients, after the peak.
    return (float(buckets), 0.0) if device == "gpu" else (0.0, float(buckets))


def zero3_gathered_params(num_params: int, zero: ZeroSettings) -> int:
    """Weight elements ZeRO-3 holds gathered at the activation peak. DeepSpeed releases a module's gathered weights
    after use only if they are not used again within stage3_max_reuse_distance elements of the traced module order
    (`partitioned_param_coordinator.py`, __params_to_release; from the second step on, when the trace is complete),
    and holds at most stage3_max_live_parameters. Every weight of the forward is used again in the backward, so by
    the end of the forward all of them are gathered unless the model is larger than those limits (then about the
    limit; prefetched weights are part of it)."""
    return min(num_params, zero.stage3_max_live_parameters, max(zero.stage3_max_reuse_distance,
                                                                zero.stage3_prefetch_bucket_size))


def activation_bytes(facts: ModelFacts, micro_batch: int, checkpointing: bool, with_grads: bool = False) -> float:
    """Peak live bytes of forward + backward beside the model states (counted at 1 and 2 sequences: linear);
    ``with_grads``: with the weights' gradients made by the moment of the peak."""
    return facts.activations[checkpointing, with_grads].at(micro_batch)


def allowance_bytes(predicted: float) -> float:
    return ALLOWANCE_FIXED + ALLOWANCE_FRACTION * predicted


def memory_breakdown(facts: ModelFacts, stage: int, world: int, micro_batch: int, checkpointing: bool,
                     precision: str = "bf16", zero: ZeroSettings = ZeroSettings(), allowance: bool = True,
                     device: str = "gpu") -> dict:
    """Bytes per GPU: parameters, gradients, optimizer, buffers, activations, allowance, total.

    The total is the peak, not the sum. The activations peak inside the backward (the MLM head's, or a layer's
    recompute with checkpointing), with the gradients made by then: where those are held as they come (ZeRO-0's
    .grad; stages 1-2 on a CPU, whose reduction buckets fill page by page) the activation figure is the counted
    peak of both together; elsewhere they go into memory counted already (ZeRO-3's partition, a GPU's whole
    buckets). The rest of the gradients and the buffers made after the backward peak at its end, when the
    activations are gone:
        total = parameters + optimizer + persistent gradients
                + max(activations + buffers alive with them, other gradients + buffers made after the backward)"""
    out = model_state_bytes(facts.num_params, facts.largest_layer_params, stage, world, precision)
    with_activations, after_backward = buffer_bytes(facts, stage, precision, zero, device)
    out["buffers"] = with_activations + after_backward
    grads_as_they_come = stage == 0 or (stage in (1, 2) and device == "cpu")
    out["activations"] = activation_bytes(facts, micro_batch, checkpointing, grads_as_they_come)
    kept = persistent_gradient_bytes(facts.num_params, stage, world, precision)
    predicted = (out["parameters"] + out["optimizer"] + kept
                 + max(out["activations"] + with_activations, out["gradients"] - kept + after_backward))
    out["allowance"] = allowance_bytes(predicted) if allowance else 0.0
    out["total"] = predicted + out["allowance"]
    return out
