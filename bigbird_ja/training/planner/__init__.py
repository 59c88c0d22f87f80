"""`bigbird-ja plan`: memory, step time and cost of a pretraining run on N GPUs, before anyone books them.

Glossary: P parameters (counted on a meta-device model: exact, shared embeddings once), n = data-parallel ranks
(GPUs), g GPUs per node, b micro-batch (sequences), a gradient-accumulation steps, N tokens per sequence, L layers,
V vocabulary. Memory is per GPU, in bytes.

Parts, each importing only the ones above it (each module's docstring writes its model out):

* `hardware`     the GPU catalogue (`GPUS`, `resolve_gpu`) and the checks of the planner's numeric inputs
* `activations`  parameters and activation bytes of one model, counted by running it on the meta device
* `memory`       the ZeRO memory model: model states, DeepSpeed's buffers, the peak, the allowance
* `timing`       the time model: compute and exposed communication of an optimizer step
* `search`       `plan_run`: every ZeRO stage x checkpointing, the recommendation, the table and its JSON
* `presets`      a preset written from a plan, and the generated block of the presets' headers
"""

from .activations import LiveBytes, ModelFacts, StepPeak, model_facts
from .hardware import GIB, GPU_RANGES, GPUS, GpuSpec, resolve_gpu
from .memory import (
    ALLOWANCE_FIXED, ALLOWANCE_FRACTION, STAGE0_ALLREDUCE_BUCKET, ZeroSettings, activation_bytes, allowance_bytes,
    buffer_bytes, memory_breakdown, model_state_bytes, persistent_gradient_bytes, zero3_gathered_params,
)
from .presets import (
    HEADER_BEGIN, HEADER_END, PLAN_ARGS_PREFIX, plan_header, preset_overrides, preset_plan, update_header,
    update_preset_headers, write_preset,
)
from .search import (
    EFFICIENCY_RANGE, MAX_GLOBAL_BATCH, MAX_GPUS, MAX_TOKENS, Plan, Row, evaluate, format_plan, parse_model_overrides,
    plan_command, plan_model_config, plan_run, write_plan_json,
)
from .timing import DEFAULT_COMPUTE_EFFICIENCY, LATENCY_S, bus_bandwidth, communication, step_time

__all__ = [
    "ALLOWANCE_FIXED", "ALLOWANCE_FRACTION", "DEFAULT_COMPUTE_EFFICIENCY", "EFFICIENCY_RANGE", "GIB", "GPUS",
    "GPU_RANGES", "GpuSpec", "HEADER_BEGIN", "HEADER_END", "LATENCY_S", "LiveBytes", "MAX_GLOBAL_BATCH", "MAX_GPUS",
    "MAX_TOKENS", "ModelFacts", "PLAN_ARGS_PREFIX", "Plan", "Row", "STAGE0_ALLREDUCE_BUCKET", "StepPeak",
    "ZeroSettings", "activation_bytes", "allowance_bytes", "buffer_bytes", "bus_bandwidth", "communication",
    "evaluate", "format_plan", "memory_breakdown", "model_facts", "model_state_bytes", "parse_model_overrides",
    "persistent_gradient_bytes", "plan_command", "plan_header", "plan_model_config", "plan_run", "preset_overrides",
    "preset_plan", "resolve_gpu", "step_time", "update_header", "update_preset_headers", "write_plan_json",
    "write_preset", "zero3_gathered_params",
]
