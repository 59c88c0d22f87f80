"""`bigbird-ja plan`: memory, step time and cost of a pretraining run on N GPUs, before anyone books them.

Glossary: P parameters (counted on a meta-device model: exact, shared embeddings once), n = data-parallel ranks
(GPUs), g GPUs per node, b micro-batch (sequences), a gradient-accumulation steps, N tokens per sequence, L layers,
V vocabulary. Memory is per GPU, in bytes.

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

Activations (per GPU): not a formula guessed beside the code but the code itself, run: one forward + backward of
the model on the meta device (no memory, no FLOPs) under `LiveBytes`, a TorchDispatchMode that counts every
storage an op creates until it is freed, and takes the peak. That is the saved activations plus what the
backward holds at its peak beside them: the gradients of the attention scores in the blocked backend, the MLM
head's three fp32 buffers of N x V (log-softmax output, its incoming gradient, the gradient it makes: 12 bytes a
logit, the loss being taken in fp32), with activation checkpointing the recompute of a layer (measured, not
estimated). It is measured at micro-batch 1 and 2 (c0 + c1 x b: the relative-position embeddings and the model's
caches are per call, the rest per sequence), once with the weights' gradients made by the moment of the peak
(held whole, as ZeRO-0's .grad) and once without (held in memory counted elsewhere: ZeRO-3's partition, a GPU's
reduction buckets). It follows the code: a change to a backend's backward changes the count. In closed form, per
layer and sequence the saved part is ~ N (alpha E + beta I) bytes for the projections, norms, GELU and dropout
masks plus gamma x (attended score elements) for the attention (`layout.attended_blocks`, the same count as the
FLOPs; full attention N^2 per head). Counted for the backend the run uses: "auto" is planned as the fused Triton
kernels (a GPU run; their custom ops, forward and backward, have meta implementations, and they keep q, k, v, the
output and the log-sum-exp, no score matrix), "blocked" / "reference" as themselves (the CPU runs of the
benchmark). Not counted: the weights' .grad while one is being accumulated into (momentary), the data loader's
batches, and on a GPU the caching allocator's rounding and fragmentation (the allowance).

Peak (`memory_breakdown`): the parts do not all peak together. The activations peak inside the backward (the
head's, or a recomputed layer's); the gradients the backward makes and the buffers made after it peak at its end:
    total = parameters + optimizer + persistent gradients (ZeRO-3's fp32 partition; bf16 ZeRO-0's fp32
            accumulator, both allocated at initialisation)
            + max(activations + buffers alive with them, the other gradients + buffers made after the backward)

Allowance (GPU): CUDA context, cuBLAS / NCCL workspaces and the caching allocator's fragmentation: 1.5 GiB + 10% of
the rest (the usual measured range: 0.5-1 GiB of context and workspace, 5-15% fragmentation). A setting fits when
the peak + allowance <= the device memory.

Step time (one optimizer step = a micro-batches per GPU):
    compute   = hardware FLOPs (`flops.hardware_training_flops`: 3 forwards, 4 with checkpointing) / (peak x eff)
                peak: `flops.PEAK_TFLOPS`; eff (default 0.40, `--compute-efficiency`): the fraction of peak the
                kernels reach, the presets' earlier assumption until the GPU suite measures one layer
    communication, per GPU, bytes B in the gradient dtype (2 bf16, 4 fp32), ring / tree algorithms:
        stage 0   all-reduce of the gradients once per step:                 2 (n-1)/n x P B
        stage 1-2 reduce-scatter of the gradients every micro-batch:          (n-1)/n x P B x a
                  + all-gather of the updated weights once per step:          (n-1)/n x P B
        stage 3   per micro-batch: weights gathered for forward and backward (and for the recompute with
                  checkpointing), gradients reduce-scattered:                (2 or 3 + 1) x (n-1)/n x P B x a
      at bus bandwidth: intra-node (NVLink) within one node; across nodes the ring crosses every node's network
      interfaces, so the bus bandwidth is the node's inter-node bandwidth (all NICs together) capped by NVLink;
      plus a latency of 2 log2(n) x 10 us per collective (tree phase) x the collectives of a step: one per
      bucket (P / bucket size) for reductions, and for ZeRO-3 one gather per module with weights above the
      persistence threshold per pass (forward, backward, recompute): why ZeRO-3 slows down with many ranks.
    overlap   gradient reduction overlaps the backward pass (overlap_comm): the exposed part is what exceeds the
              backward time (2/3 of the compute), plus the last bucket; stage-3 gathers are prefetched: exposed is what
              exceeds the compute time; stage 0's all-reduce and stage 1-2's weight all-gather run after the backward
              and the optimizer step: fully exposed.
    step time = compute + exposed communication;  MFU = model FLOPs / (step time x peak)
Scaling efficiency: tokens/s per GPU on the planned nodes / tokens/s per GPU on one node, same setting.
Days and GPU-hours: steps = tokens / (global batch x N), time = steps x step time.

Defaults per GPU kind (`GPUS`; `--memory-gib --peak-tflops --intra-node-gbps --inter-node-gbps` for anything else):
memory as sold (usable capacity); peak from `flops.PEAK_TFLOPS`; intra-node bus bandwidth: NCCL all-reduce bus
bandwidth of nccl-tests on DGX machines (A100 NVLink3 ~230 GB/s, H100/H200 NVLink4 ~370 GB/s); inter-node: the NICs
of a node at ~90% of line rate: A100 nodes with 4 x HDR 200 Gb/s (the layout of this project's presets and of
ABCI's A nodes) ~90 GB/s, H100/H200 nodes with 8 x NDR 400 Gb/s ~360 GB/s.

Recommendation: among the settings that fit, the fastest (tokens/s); any within 1% of it count as ties, which go to
the lower ZeRO stage and to no checkpointing (fewer collectives, no recompute, less to go wrong).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .config import ZeroSection

GIB = 2 ** 30
ALLOWANCE_FIXED = 1.5 * GIB
ALLOWANCE_FRACTION = 0.10
LATENCY_S = 10e-6
DEFAULT_COMPUTE_EFFICIENCY = 0.40
STAGE0_ALLREDUCE_BUCKET = 500_000_000  # DeepSpeed's allreduce_bucket_size default (stage 0's flat copy)


@dataclass(frozen=True)
class GpuSpec:
    """A device kind: memory (GiB), bf16 / fp32 peak (TFLOP/s), bus bandwidths (GB/s) within and between nodes."""

    name: str
    memory_gib: float
    peak_name: str | None  # the key into flops.PEAK_TFLOPS, None: peak given
    intra_node_gbps: float
    inter_node_gbps: float
    peak_tflops_override: float | None = None

    def peak_tflops(self, precision: str) -> float:
        from .flops import peak_tflops

        if self.peak_tflops_override is not None:
            return self.peak_tflops_override
        return peak_tflops(self.peak_name, precision)


GPUS = {
    "a100-40gb": GpuSpec("A100 40GB SXM", 40.0, "A100", 230.0, 90.0),
    "a100-80gb": GpuSpec("A100 80GB SXM", 80.0, "A100", 230.0, 90.0),
    "h100": GpuSpec("H100 80GB SXM", 80.0, "H100", 370.0, 360.0),
    "h200": GpuSpec("H200 141GB SXM", 141.0, "H200", 370.0, 360.0),
}


# What the planner takes. Outside these ranges an input is a typo, not a machine or a run, and the arithmetic would
# divide by zero or overflow into inf / nan figures: refused, naming the option (the CLI's; `preset_plan` reads the
# same options from a preset's `# plan-args:` line).
GPU_RANGES = {  # GpuSpec field: (option, lowest, highest)
    "memory_gib": ("--memory-gib", 1e-3, 1e6),
    "peak_tflops_override": ("--peak-tflops", 1e-3, 1e6),
    "intra_node_gbps": ("--intra-node-gbps", 1e-3, 1e6),
    "inter_node_gbps": ("--inter-node-gbps", 1e-3, 1e6),
}
EFFICIENCY_RANGE = (1e-3, 1.0)
MAX_TOKENS = 1e18  # a million times the largest runs' budgets
MAX_GPUS = 10_000_000
MAX_GLOBAL_BATCH = 1_000_000_000


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_number(option: str, value, lowest: float, highest: float, what: str) -> None:
    """``value`` is a finite number in [lowest, highest], else a ValueError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lowest <= value <= highest:
        raise ValueError(f"{option} {_shown(value)}: must be a number from {lowest:g} to {highest:g} ({what})")


def _check_count(option: str, value, highest: int | None = None, what: str = "") -> None:
    """``value`` is a whole number >= 1 (and <= ``highest``), else a ValueError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} {_shown(value)}: must be a positive whole number{what and f' ({what})'}")
    if highest is not None and value > highest:
        raise ValueError(f"{option} {value}: the planner takes at most {highest:,}{what and f' ({what})'}")


def resolve_gpu(kind: str, memory_gib=None, peak_tflops=None, intra_node_gbps=None,
                inter_node_gbps=None) -> GpuSpec:
    """A known kind (overrides laid over it) or, for any other name, a spec made entirely of the overrides."""
    given = {"memory_gib": memory_gib, "peak_tflops_override": peak_tflops, "intra_node_gbps": intra_node_gbps,
             "inter_node_gbps": inter_node_gbps}
    for key, value in given.items():
        if value is not None:
            option, lowest, highest = GPU_RANGES[key]
            _check_number(option, value, lowest, highest, "GiB, TFLOP/s, GB/s of one GPU")
    key = kind.lower()
    if key in GPUS:
        return replace(GPUS[key], **{k: v for k, v in given.items() if v is not None})
    missing = [k for k, v in given.items() if v is None]
    if missing:
        flags = {"memory_gib": "--memory-gib", "peak_tflops_override": "--peak-tflops",
                 "intra_node_gbps": "--intra-node-gbps", "inter_node_gbps": "--inter-node-gbps"}
        raise ValueError(f"--gpu {kind!r}: not a known GPU kind ({', '.join(GPUS)}). Use one of those, or describe "
                         f"the device with all of {', '.join(flags[k] for k in given)} (missing: "
                         f"{', '.join(flags[k] for k in missing)})")
    return GpuSpec(kind, memory_gib, None, intra_node_gbps, inter_node_gbps, peak_tflops)


# ----------------------------------------------------------------------------------------------------------------
# The model: parameters and activations counted on the meta device


@dataclass(frozen=True)
class ModelFacts:
    """What the memory model needs to know about one model at one sequence length and precision."""

    num_params: int
    largest_layer_params: int  # DeepSpeed's model_to_params: the largest module's own parameters
    persistent_params: int  # parameters in tensors below stage3_param_persistence_threshold (ZeRO-3 keeps whole)
    gathered_modules: int  # modules whose own weights ZeRO-3 gathers (one all-gather each per pass)
    num_layers: int
    # peak live bytes of forward + backward, (checkpointing, with the weights' gradients made so far) -> c0 + c1 x b
    activations: dict[tuple[bool, bool], StepPeak]


@dataclass(frozen=True)
class StepPeak:
    """Peak live bytes of one forward + backward of b sequences: per_call + b x per_sequence (measured at b = 1 and
    2; per_call: what does not grow with the batch, e.g. relative-position embeddings and the model's caches)."""

    per_call: float
    per_sequence: float

    def at(self, micro_batch: int) -> float:
        return self.per_call + micro_batch * self.per_sequence


class LiveBytes:
    """Bytes of the tensor storages that ops create while it is active, alive now and at their peak.

    A TorchDispatchMode (every aten op passes through it, forward and backward): each new output storage is
    counted when it is made and uncounted when it is freed (a weakref finalizer on the storage). Storages made
    before it started (weights, inputs) are not counted; neither are views (they share a counted storage). Works
    on real and meta tensors alike (on meta the sizes are real, nothing is allocated)."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                tracker._count(torch.utils._pytree.tree_leaves(out), {t.untyped_storage()._cdata for t in inputs})
                return out

        self.mode, self.now, self.peak, self._alive = _Mode(), 0, 0, set()
        self.grads = 0  # bytes of the weights' gradients (set by the caller): peak_without_grads leaves them out
        self.peak_without_grads = 0

    def _count(self, outputs, input_storages: set) -> None:
        import weakref

        import torch

        for t in outputs:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            # a view or an in-place result shares its input's storage: nothing new (and a weight's view is no
            # activation)
            if key in self._alive or key in input_storages:
                continue
            size = storage.nbytes()
            self._alive.add(key)
            self.now += size
            self.peak = max(self.peak, self.now)
            self.peak_without_grads = max(self.peak_without_grads, self.now - self.grads)
            weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.now -= size

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _step_peak_bytes(model, input_ids) -> tuple[int, int, int]:
    """Peak live bytes of one forward + backward on the device of ``input_ids``: saved activations, the
    temporaries of each op (the softmax and score gradients of the attention, the gradient of the MLM logits, ...),
    the recompute under activation checkpointing. Returns (peak with the weights' gradients made so far, peak
    without them, bytes still alive after the step: what the model caches, e.g. layouts). The gradients are kept
    whole as autograd makes them (ZeRO-0's .grad); without them is the peak where something else holds them
    (ZeRO-3's partition, a GPU's reduction buckets: counted by the model states)."""
    counted = set()

    def count(p):
        if id(p) not in counted:  # tied weights accumulate twice into one gradient
            counted.add(id(p))
            live.grads += p.grad.untyped_storage().nbytes()

    hooks = [p.register_post_accumulate_grad_hook(count) for p in model.parameters() if p.requires_grad]
    try:
        with LiveBytes() as live:
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            for p in model.parameters():
                p.grad = None
            live.grads = 0
    finally:
        for h in hooks:
            h.remove()
    return live.peak, live.peak_without_grads, live.now


def model_facts(config, seq_len: int, precision: str, persistence_threshold: int = 100_000) -> ModelFacts:
    """Count parameters and activation bytes of ``config`` at ``seq_len`` (no memory used: meta tensors)."""
    import torch

    from ..modeling import BigBirdJaForMaskedLM

    from unittest import mock

    from .. import attention

    config = config.__class__.from_dict(config.to_dict())
    # "auto" is the fused Triton kernels on a GPU (what is planned); their custom ops have meta implementations
    backend = "triton" if config.attention_backend == "auto" else config.attention_backend
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} is longer than the model's max_position_embeddings="
                         f"{config.max_position_embeddings}: plan a model preset made for that length")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device("meta"):
        model = BigBirdJaForMaskedLM(config).to(dtype).train()
    params = {p.data_ptr() if p.device.type != "meta" else id(p): p for p in model.parameters()}
    num_params = sum(p.numel() for p in params.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    persistent = sum(p.numel() for p in params.values() if p.numel() < persistence_threshold)
    gathered = sum(1 for m in model.modules()
                   if any(p.numel() >= persistence_threshold for p in m.parameters(recurse=False)))

    activations = {}
    with mock.patch.object(attention, "resolve_backend", lambda requested, device: backend):
        for ckpt in (False, True):
            if ckpt:
                model.activation_checkpointing_enable()
            ids = {b: torch.zeros(b, seq_len, dtype=torch.long, device="meta") for b in (1, 2)}
            # the first call fills the model's caches (block layouts, relative positions): alive through every later
            # step, so counted once beside the batch-independent part; the linear fit is made on warm calls
            cached = _step_peak_bytes(model, ids[1])[2]
            one, two = (_step_peak_bytes(model, ids[b]) for b in (1, 2))
            for with_grads in (True, False):
                i = 0 if with_grads else 1
                activations[ckpt, with_grads] = StepPeak(float(2 * one[i] - two[i] + cached),
                                                         float(two[i] - one[i]))
    return ModelFacts(num_params, largest, persistent, gathered, config.num_hidden_layers, activations)


# ----------------------------------------------------------------------------------------------------------------
# Memory


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
    """Peak live bytes of forward + backward beside the model states (measured at 1 and 2 sequences: linear);
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
    .grad; stages 1-2 on a CPU, whose reduction buckets fill page by page) the activation figure is the measured
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


# ----------------------------------------------------------------------------------------------------------------
# Time


def bus_bandwidth(gpu: GpuSpec, nodes: int) -> float:
    """Bytes/s of a ring collective: NVLink within a node; across nodes, each node's NICs together (<= NVLink)."""
    gbps = gpu.intra_node_gbps if nodes == 1 else min(gpu.intra_node_gbps, gpu.inter_node_gbps)
    return gbps * 1e9


def communication(facts: ModelFacts, stage: int, world: int, accum: int, checkpointing: bool, precision: str,
                  zero: ZeroSettings = ZeroSettings()) -> tuple[float, float, int]:
    """(bytes overlappable with compute, bytes exposed, collectives) per GPU per optimizer step."""
    if world == 1:
        return 0.0, 0.0, 0
    P = facts.num_params
    elem = 2 if precision == "bf16" else 4
    share = (world - 1) / world * P * elem
    if stage == 0:
        return 0.0, 2 * share, math.ceil(P / STAGE0_ALLREDUCE_BUCKET)
    if stage in (1, 2):
        buckets = math.ceil(P / zero.reduce_bucket_size)
        return share * accum, share, buckets * accum + math.ceil(P / zero.allgather_bucket_size)
    gathers = 3 if checkpointing else 2
    collectives = (gathers * facts.gathered_modules + math.ceil(P / zero.reduce_bucket_size)) * accum
    return (gathers + 1) * share * accum, 0.0, collectives


@dataclass
class Row:
    """One setting of the table."""

    stage: int
    checkpointing: bool
    micro_batch: int
    accum: int
    memory: dict
    fits: bool
    compute_s: float = 0.0
    exposed_comm_s: float = 0.0
    step_s: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    largest_micro_batch: int = 0  # the largest that fits this setting (0: none)
    scaling: float = 0.0
    days: float = 0.0
    gpu_hours: float = 0.0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def step_time(config, facts: ModelFacts, gpu: GpuSpec, nodes: int, gpus_per_node: int, seq_len: int, stage: int,
              checkpointing: bool, micro_batch: int, accum: int, precision: str, efficiency: float,
              zero: ZeroSettings = ZeroSettings()) -> tuple[float, float]:
    """(compute seconds, exposed communication seconds) of one optimizer step (module docstring)."""
    from .flops import hardware_training_flops

    world = nodes * gpus_per_node
    peak = gpu.peak_tflops(precision) * 1e12
    compute = hardware_training_flops(config, seq_len, micro_batch, accum, checkpointing) / (peak * efficiency)
    overlapped, exposed, collectives = communication(facts, stage, world, accum, checkpointing, precision, zero)
    bandwidth = bus_bandwidth(gpu, nodes)
    latency = collectives * 2 * math.log2(max(world, 2)) * LATENCY_S if world > 1 else 0.0
    hidden_by = compute if stage == 3 else compute * 2 / 3  # gathers overlap everything; reductions the backward
    over_t = overlapped / bandwidth
    last_bucket = 0.0
    if stage in (1, 2) and overlapped:
        bucket_share = min(1.0, zero.reduce_bucket_size / facts.num_params)
        last_bucket = over_t / accum * bucket_share
    exposed_t = exposed / bandwidth + max(0.0, over_t - hidden_by) + last_bucket + latency
    return compute, exposed_t


# ----------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """The table, the recommendation and the inputs it was made from."""

    model_preset: str
    model_overrides: dict
    seq_len: int
    gpu: GpuSpec
    nodes: int
    gpus_per_node: int
    tokens: float
    precision: str
    target_global_batch: int
    efficiency: float
    num_params: int
    rows: list[Row] = field(default_factory=list)
    recommended: Row | None = None
    reason: str = ""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def _accumulation(target_global: int, micro: int, world: int) -> int:
    return max(1, round(target_global / (micro * world)))


def _largest_fitting_micro(facts, stage, world, ckpt, precision, zero, capacity, limit=256) -> int:
    """0 when not even one sequence fits (memory grows with the micro-batch: bisection)."""
    def fits(b):
        return memory_breakdown(facts, stage, world, b, ckpt, precision, zero)["total"] <= capacity

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def evaluate(config, facts, gpu, nodes, gpus_per_node, seq_len, stage, ckpt, micro, target_global, tokens,
             precision, efficiency, zero=ZeroSettings()) -> Row:
    """One setting: memory, fit, time, scaling and cost."""
    world = nodes * gpus_per_node
    accum = _accumulation(target_global, micro, world)
    memory = memory_breakdown(facts, stage, world, micro, ckpt, precision, zero)
    row = Row(stage, ckpt, micro, accum, memory, memory["total"] <= gpu.memory_gib * GIB)
    compute, exposed = step_time(config, facts, gpu, nodes, gpus_per_node, seq_len, stage, ckpt, micro, accum,
                                 precision, efficiency, zero)
    from .flops import training_flops

    row.compute_s, row.exposed_comm_s, row.step_s = compute, exposed, compute + exposed
    global_batch = micro * accum * world
    row.tokens_per_s = global_batch * seq_len / row.step_s
    row.mfu = training_flops(config, seq_len, micro, accum) / (row.step_s * gpu.peak_tflops(precision) * 1e12)
    c1, e1 = step_time(config, facts, gpu, 1, gpus_per_node, seq_len, stage, ckpt, micro, accum, precision,
                       efficiency, zero)
    row.scaling = (c1 + e1) / row.step_s
    steps = math.ceil(tokens / (global_batch * seq_len))
    row.days = steps * row.step_s / 86400
    row.gpu_hours = row.days * 24 * world
    return row


def plan_model_config(model, seq_len: int, overrides: dict | None = None):
    """The model a plan is for: ``model`` (preset, config.json or folder) with ``overrides`` laid over it, as
    pretraining builds it. A length beyond its max_position_embeddings is refused: the model refuses such inputs."""
    from ..configuration import build_model_config

    config = build_model_config(model, overrides, what="--model-override")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings="
                         f"{config.max_position_embeddings} ({model}), and the model refuses longer inputs. Plan "
                         f"--seq-len {config.max_position_embeddings} or less, or a longer model: --model-override "
                         f"max_position_embeddings={seq_len} (pretraining then needs "
                         f"--model.overrides.max_position_embeddings={seq_len} too)")
    return config


def plan_run(model: str, seq_len: int, gpu: GpuSpec, nodes: int, gpus_per_node: int, tokens: float, *,
             global_batch: int = 2048, precision: str = "bf16", micro_batch: int | None = None,
             efficiency: float = DEFAULT_COMPUTE_EFFICIENCY, model_overrides: dict | None = None,
             zero: ZeroSettings = ZeroSettings(), facts: ModelFacts | None = None) -> Plan:
    """The table over ZeRO 0-3 x checkpointing at the largest micro-batch that fits (or ``micro_batch``)."""
    _check_count("--seq-len", seq_len)
    _check_count("--nodes", nodes)
    _check_count("--gpus-per-node", gpus_per_node)
    _check_count("--nodes x --gpus-per-node", nodes * gpus_per_node, MAX_GPUS, "GPUs")
    _check_count("--global-batch", global_batch, MAX_GLOBAL_BATCH, "sequences per optimizer step")
    if micro_batch is not None:
        _check_count("--micro-batch", micro_batch, what="sequences per GPU; leave it out for the largest that fits")
    _check_number("--tokens", tokens, 1.0, MAX_TOKENS, "the token budget of the run, e.g. 48e9")
    _check_number("--compute-efficiency", efficiency, *EFFICIENCY_RANGE, "the fraction of peak the kernels reach")
    config = plan_model_config(model, seq_len, model_overrides)
    facts = facts or model_facts(config, seq_len, precision, zero.stage3_param_persistence_threshold)
    plan = Plan(str(model), dict(model_overrides or {}), seq_len, gpu, nodes, gpus_per_node, tokens, precision, global_batch, efficiency,
                facts.num_params)
    capacity = gpu.memory_gib * GIB
    target_micro = max(1, global_batch // plan.world)
    largest = {(stage, ckpt): _largest_fitting_micro(facts, stage, plan.world, ckpt, precision, zero, capacity)
               for stage in range(4) for ckpt in (False, True)}
    best_fit = max(largest.values())
    if best_fit == 0:
        need, stage, ckpt = min((memory_breakdown(facts, stage, plan.world, 1, ckpt, precision, zero)["total"], stage,
                                 ckpt) for stage, ckpt in largest)
        raise ValueError(f"no setting fits: even one {seq_len}-token sequence per GPU needs {need / GIB:,.1f} GiB "
                         f"(ZeRO-{stage}, checkpointing {'on' if ckpt else 'off'}) on a "
                         f"{gpu.memory_gib:g} GiB {gpu.name}. Use a GPU with more memory (--gpu, --memory-gib), "
                         f"more GPUs (--nodes, --gpus-per-node: ZeRO-3 shards the states over them), or shorter "
                         f"sequences (--seq-len)")
    if micro_batch is not None and micro_batch > best_fit:
        raise ValueError(f"--micro-batch {micro_batch} never fits a {gpu.memory_gib:g} GiB {gpu.name} at "
                         f"{seq_len} tokens: the largest that fits is {best_fit} (ZeRO-3 with activation "
                         f"checkpointing unless the table says otherwise). Use --micro-batch {best_fit} or less, or "
                         f"leave it out to see the largest per setting")
    for (stage, ckpt), fit in largest.items():
        # no bigger than the target global batch asks of each GPU: the global batch is a training choice
        micro = micro_batch if micro_batch is not None else max(1, min(fit, target_micro))
        row = evaluate(config, facts, gpu, nodes, gpus_per_node, seq_len, stage, ckpt, micro, global_batch,
                       tokens, precision, efficiency, zero)
        row.largest_micro_batch = fit
        plan.rows.append(row)
    fitting = [r for r in plan.rows if r.fits]
    fastest = max(r.tokens_per_s for r in fitting)  # within 1% of it: the simpler setting wins
    best = min((r for r in fitting if r.tokens_per_s >= 0.99 * fastest), key=lambda r: (r.stage, r.checkpointing))
    plan.recommended = best
    runner_up = sorted((r for r in fitting if r is not best), key=lambda r: r.days)
    why = (f"fits ({best.memory['total'] / GIB:,.1f} of {gpu.memory_gib:g} GiB) with the highest throughput "
           f"({best.tokens_per_s / 1e6:,.2f} M tokens/s)")
    if runner_up:
        r = runner_up[0]
        why += (f"; next: ZeRO-{r.stage}{' + checkpointing' if r.checkpointing else ''} at micro-batch "
                f"{r.micro_batch}, {r.days / best.days - 1:+.1%} days")
    unfit = [r for r in plan.rows if not r.fits]
    if unfit:
        why += f"; {len(unfit)} of {len(plan.rows)} settings do not fit"
    plan.reason = why
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Output


def format_plan(plan: Plan) -> str:
    g = plan.gpu
    lines = [
        f"plan: {plan.model_preset} ({plan.num_params / 1e6:,.1f} M parameters), {plan.seq_len:,}-token sequences, "
        f"{plan.precision}; {plan.nodes} node(s) x {plan.gpus_per_node} {g.name} = {plan.world} GPUs "
        f"({g.memory_gib:g} GiB, {g.peak_tflops(plan.precision):g} TFLOP/s peak, bus {g.intra_node_gbps:g} GB/s "
        f"in a node / {g.inter_node_gbps:g} GB/s a node across); {plan.tokens:.3g} tokens; global batch ~"
        f"{plan.target_global_batch} sequences; compute at {plan.efficiency:.0%} of peak",
        "memory per GPU in GiB at micro = min(largest that fits, target global batch / GPUs); total = the peak "
        "(params + optimizer + gradients kept between steps + the larger of activations + buffers beside them and "
        "the other gradients + buffers made after the backward) + allowance, not the sum of the columns",
        "| ZeRO | ckpt | largest fit | micro | accum | global | params | grads | optim | buffers | activ. | allow. | total | fits "
        "| compute s | exposed comm s | step s | M tok/s | MFU | scaling vs 1 node | days | GPU-hours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in plan.rows:
        m = {k: v / GIB for k, v in r.memory.items()}
        mark = " **<-**" if r is plan.recommended else ""
        lines.append(
            f"| {r.stage} | {'on' if r.checkpointing else 'off'} | {r.largest_micro_batch} | {r.micro_batch} | "
            f"{r.accum} | "
            f"{r.micro_batch * r.accum * plan.world} | {m['parameters']:.2f} | {m['gradients']:.2f} | "
            f"{m['optimizer']:.2f} | {m['buffers']:.2f} | {m['activations']:.2f} | {m['allowance']:.2f} | "
            f"{m['total']:.2f} | {'yes' if r.fits else 'NO'} | {r.compute_s:.3f} | {r.exposed_comm_s:.3f} | "
            f"{r.step_s:.3f} | {r.tokens_per_s / 1e6:.2f} | {r.mfu:.1%} | {r.scaling:.1%} | {r.days:.3g} | "
            f"{r.gpu_hours:,.0f} |{mark}")
    b = plan.recommended
    lines.append(f"recommended: ZeRO-{b.stage}, activation checkpointing {'on' if b.checkpointing else 'off'}, "
                 f"micro-batch {b.micro_batch} x {b.accum} accumulation x {plan.world} GPUs = "
                 f"{b.micro_batch * b.accum * plan.world} sequences per step: {b.step_s:.3f} s per step, "
                 f"{b.days:.3g} days ({b.days * 24:.3g} h), {b.gpu_hours:,.0f} GPU-hours. Why: {plan.reason}")
    return "\n".join(lines)


def preset_overrides(plan: Plan, name: str) -> list[str]:
    """The --section.key=value overrides that make a base preset run the recommended setting."""
    b = plan.recommended
    global_batch = b.micro_batch * b.accum * plan.world
    steps = math.ceil(plan.tokens / (global_batch * plan.seq_len))
    return [f"--run.name={name}", f"--run.output_dir=runs/{name}", f"--model.preset={plan.model_preset}",
            f"--prepare.seq_len={plan.seq_len}", f"--batch.micro_batch_size={b.micro_batch}",
            f"--batch.global_batch_size={global_batch}", "--batch.grad_accum_steps=null",
            f"--train.max_steps={steps}", f"--train.precision={plan.precision}",
            f"--train.activation_checkpointing={str(b.checkpointing).lower()}", f"--zero.stage={b.stage}"]


def plan_header(plan: Plan, row: Row, command: str) -> list[str]:
    """The generated comment block: the planner's figures for ``row`` (between the markers)."""
    m = row.memory
    return [
        HEADER_BEGIN,
        f"# {command}",
        f"# {plan.nodes} x {plan.gpus_per_node} {plan.gpu.name} = {plan.world} GPUs, {plan.precision}, ZeRO-{row.stage}, "
        f"checkpointing {'on' if row.checkpointing else 'off'}, micro-batch {row.micro_batch} x {row.accum} "
        f"accumulation = {row.micro_batch * row.accum * plan.world} sequences of {plan.seq_len:,} tokens per step",
        f"# peak memory per GPU: {m['total'] / GIB:.1f} of {plan.gpu.memory_gib:g} GiB "
        f"({'fits' if row.fits else 'DOES NOT FIT'}; of params {m['parameters'] / GIB:.2f}, grads "
        f"{m['gradients'] / GIB:.2f}, optimizer {m['optimizer'] / GIB:.2f}, buffers {m['buffers'] / GIB:.2f}, "
        f"activations {m['activations'] / GIB:.2f}, allowance {m['allowance'] / GIB:.2f})",
        f"# step: {row.step_s:.3f} s ({row.compute_s:.3f} compute at {plan.efficiency:.0%} of peak + "
        f"{row.exposed_comm_s:.3f} exposed communication), {row.tokens_per_s / 1e6:.2f} M tokens/s, MFU "
        f"{row.mfu:.0%}, scaling vs one node {row.scaling:.0%}",
        f"# {plan.tokens:.3g} tokens: {row.days:.3g} days ({row.days * 24:.3g} h), {row.gpu_hours:,.0f} GPU-hours",
        HEADER_END,
    ]


HEADER_BEGIN = "# --- plan (generated by `bigbird-ja plan --update-headers`; do not edit by hand) ---"
HEADER_END = "# --- end plan ---"
PLAN_ARGS_PREFIX = "# plan-args:"


def plan_command(plan: Plan) -> str:
    """The command line that makes this plan (written into presets and JSON)."""
    g = plan.gpu
    gpu = f"--gpu {g.name}" if g.peak_name else (
        f"--gpu {g.name} --memory-gib {g.memory_gib:g} --peak-tflops {g.peak_tflops_override:g} "
        f"--intra-node-gbps {g.intra_node_gbps:g} --inter-node-gbps {g.inter_node_gbps:g}")
    kind = next((k for k, v in GPUS.items() if v.name == g.name), None)
    if kind:
        gpu = f"--gpu {kind}"
    extra = "".join(f" --model-override {k}={v}" for k, v in plan.model_overrides.items())
    return (f"bigbird-ja plan --model {plan.model_preset}{extra} --seq-len {plan.seq_len} {gpu} --nodes {plan.nodes} "
            f"--gpus-per-node {plan.gpus_per_node} --tokens {plan.tokens:.3g} --global-batch "
            f"{plan.target_global_batch} --precision {plan.precision} --compute-efficiency {plan.efficiency:g}")


def parse_model_overrides(items: list[str]) -> dict:
    """KEY=VALUE strings (values read as YAML) as a dict of model config overrides."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--model-override {item!r}: expected KEY=VALUE, e.g. attention_type=full")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def write_plan_json(plan: Plan, path: str | Path) -> None:
    import json

    from ..common.atomic_io import atomic_write_text

    data = {"command": plan_command(plan), "num_params": plan.num_params, "gpu": plan.gpu.__dict__,
            "rows": [r.as_dict() for r in plan.rows],
            "recommended": plan.rows.index(plan.recommended), "reason": plan.reason}
    atomic_write_text(path, json.dumps(data, indent=1) + "\n", durable=False)


def write_preset(plan: Plan, base_preset: str | Path, out: str | Path) -> Path:
    """The recommended setting as a pretraining preset: the base preset with its batch, ZeRO, checkpointing, model,
    length and steps replaced (through the strict loader, so the file is valid), written atomically."""
    from ..common.atomic_io import atomic_write_text
    from .config import load_pretrain_config

    out = Path(out)
    cfg = load_pretrain_config(base_preset, preset_overrides(plan, out.stem))
    command = plan_command(plan)
    args = _preset_args(plan)
    header = [f"# {out.stem}: written by `bigbird-ja plan` from {base_preset} (the planner's recommended setting).",
              f"# Hardware: {plan.nodes} node(s) x {plan.gpus_per_node} {plan.gpu.name}. Check with `bigbird-ja "
              f"pretrain --config {out} --dry-run`.",
              f"{PLAN_ARGS_PREFIX} {args}",
              *plan_header(plan, plan.recommended, command)]
    atomic_write_text(out, "\n".join(header) + "\n" + cfg.to_yaml(), durable=False)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Preset headers


def _header_end(lines: list[str]) -> int:
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        i += 1
    return i


def update_header(path: Path, run_plan) -> bool:
    """Rewrite the generated block of one preset's header from its `# plan-args:` line; True if it changed.
    ``run_plan(args list, cfg)`` returns (plan, row, command). Only comment lines of the leading header change."""
    import shlex

    from ..common.atomic_io import atomic_write_text
    from .config import load_pretrain_config

    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    end = _header_end(lines)
    args_line = next((line for line in lines[:end] if line.startswith(PLAN_ARGS_PREFIX)), None)
    if args_line is None:
        return False
    cfg = load_pretrain_config(path)
    plan, row, command = run_plan(shlex.split(args_line[len(PLAN_ARGS_PREFIX):]), cfg)
    block = plan_header(plan, row, command)
    header = lines[:end]
    if HEADER_BEGIN in header:
        start, stop = header.index(HEADER_BEGIN), header.index(HEADER_END) + 1
        header[start:stop] = block
    else:
        at = header.index(args_line) + 1
        header[at:at] = block
    new = "\n".join(header + lines[end:])
    if new != text:
        atomic_write_text(path, new, durable=False)
        return True
    return False


def _preset_args(plan: Plan) -> str:
    """The `# plan-args:` of a preset: the hardware and budget (the rest is read from the preset itself)."""
    kind = next((k for k, v in GPUS.items() if v.name == plan.gpu.name), plan.gpu.name)
    return (f"--gpu {kind} --nodes {plan.nodes} --gpus-per-node {plan.gpus_per_node} --compute-efficiency "
            f"{plan.efficiency:g}")


def preset_plan(args: list[str], cfg) -> tuple[Plan, Row, str]:
    """The planner's figures for a preset's own setting on the hardware its `# plan-args:` line names (the token
    budget is the preset's: max_steps x global batch x seq_len)."""
    import argparse

    parser = argparse.ArgumentParser(prog="# plan-args:", add_help=False)
    parser.add_argument("--gpu", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--compute-efficiency", type=float, default=DEFAULT_COMPUTE_EFFICIENCY)
    for flag in ("--memory-gib", "--peak-tflops", "--intra-node-gbps", "--inter-node-gbps"):
        parser.add_argument(flag, type=float)
    a = parser.parse_args(args)
    gpu = resolve_gpu(a.gpu, a.memory_gib, a.peak_tflops, a.intra_node_gbps, a.inter_node_gbps)
    world = a.nodes * a.gpus_per_node
    seq = cfg.prepare.seq_len
    from .config import resolve_batch

    batch = resolve_batch(cfg.batch, world)
    tokens = float(cfg.train.max_steps * batch.global_batch_size * seq)
    model = cfg.model.preset or cfg.model.init_from
    overrides = {k: v for k, v in cfg.model.overrides.items() if k != "attention_backend"}
    z = cfg.zero
    zero = ZeroSettings.from_section(z)
    plan = plan_run(model, seq, gpu, a.nodes, a.gpus_per_node, tokens, global_batch=batch.global_batch_size,
                    precision=cfg.train.precision, efficiency=a.compute_efficiency, model_overrides=overrides,
                    zero=zero)
    config = plan_model_config(model, seq, overrides)
    facts = model_facts(config, seq, cfg.train.precision, z.stage3_param_persistence_threshold)
    row = evaluate(config, facts, gpu, a.nodes, a.gpus_per_node, seq, z.stage, cfg.train.activation_checkpointing,
                   batch.micro_batch_size, batch.global_batch_size, tokens, cfg.train.precision,
                   a.compute_efficiency, zero)
    return plan, row, plan_command(plan)


def update_preset_headers(folder: str | Path = "configs/pretrain") -> list[tuple[Path, bool]]:
    """`bigbird-ja plan --update-headers`: every preset with a `# plan-args:` line gets its block regenerated."""
    return [(path, update_header(path, preset_plan)) for path in sorted(Path(folder).glob("*.yaml"))]
