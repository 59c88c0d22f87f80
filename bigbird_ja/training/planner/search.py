"""The search: every ZeRO stage x activation checkpointing at the largest micro-batch that fits, the recommended
setting, and the table (markdown, JSON) that shows them.

Per setting (`evaluate`): the memory model's peak and fit, the time model's step time, and from them
    scaling   tokens/s per GPU on the planned nodes / tokens/s per GPU on one node, same setting
    cost      steps = tokens / (global batch x N), days = steps x step time, GPU-hours = days x 24 x GPUs

Recommendation: among the settings that fit, the fastest (tokens/s); any within 1% of it count as ties, which go to
the lower ZeRO stage and to no checkpointing (fewer collectives, no recompute, less to go wrong).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .activations import ModelFacts, model_facts
from .hardware import GIB, GpuSpec, check_count, check_number, gpu_kind
from .memory import ZeroSettings, memory_breakdown
from .timing import DEFAULT_COMPUTE_EFFICIENCY, step_time

# What a run may ask of the planner (the GPU's own ranges are `hardware.GPU_RANGES`): beyond these an input is a
# typo, and the arithmetic would overflow into inf / nan figures.
EFFICIENCY_RANGE = (1e-3, 1.0)
MAX_TOKENS = 1e18  # a million times the largest runs' budgets
MAX_GPUS = 10_000_000
MAX_GLOBAL_BATCH = 1_000_000_000


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
    from ..flops import training_flops

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
    from ...configuration import build_model_config

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
    check_count("--seq-len", seq_len)
    check_count("--nodes", nodes)
    check_count("--gpus-per-node", gpus_per_node)
    check_count("--nodes x --gpus-per-node", nodes * gpus_per_node, MAX_GPUS, "GPUs")
    check_count("--global-batch", global_batch, MAX_GLOBAL_BATCH, "sequences per optimizer step")
    if micro_batch is not None:
        check_count("--micro-batch", micro_batch, what="sequences per GPU; leave it out for the largest that fits")
    check_number("--tokens", tokens, 1.0, MAX_TOKENS, "the token budget of the run, e.g. 48e9")
    check_number("--compute-efficiency", efficiency, *EFFICIENCY_RANGE, "the fraction of peak the kernels reach")
    config = plan_model_config(model, seq_len, model_overrides)
    facts = facts or model_facts(config, seq_len, precision, zero.stage3_param_persistence_threshold)
    plan = Plan(str(model), dict(model_overrides or {}), seq_len, gpu, nodes, gpus_per_node, tokens, precision,
                global_batch, efficiency, facts.num_params)
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


def plan_command(plan: Plan) -> str:
    """The command line that makes this plan (written into presets and JSON)."""
    g = plan.gpu
    gpu = f"--gpu {g.name}" if g.peak_name else (
        f"--gpu {g.name} --memory-gib {g.memory_gib:g} --peak-tflops {g.peak_tflops_override:g} "
        f"--intra-node-gbps {g.intra_node_gbps:g} --inter-node-gbps {g.inter_node_gbps:g}")
    kind = gpu_kind(g)
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

    from ...common.atomic_io import atomic_write_text

    data = {"command": plan_command(plan), "num_params": plan.num_params, "gpu": plan.gpu.__dict__,
            "rows": [r.as_dict() for r in plan.rows],
            "recommended": plan.rows.index(plan.recommended), "reason": plan.reason}
    atomic_write_text(path, json.dumps(data, indent=1) + "\n", durable=False)
