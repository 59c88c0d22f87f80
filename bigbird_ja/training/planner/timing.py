"""The time model: compute and exposed communication of one optimizer step (= a micro-batches per GPU).

    compute   = hardware FLOPs (`flops.hardware_training_flops`: 3 forwards, 4 with checkpointing) / (peak x eff)
                peak: `flops.PEAK_TFLOPS`; eff (default 0.40, `--compute-efficiency`): the fraction of peak the
                kernels reach (measure it with benchmarks/run_gpu_suite.sh)
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
"""

from __future__ import annotations

import math

from .activations import ModelFacts
from .hardware import GpuSpec
from .memory import STAGE0_ALLREDUCE_BUCKET, ZeroSettings

LATENCY_S = 10e-6
DEFAULT_COMPUTE_EFFICIENCY = 0.40


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


def step_time(config, facts: ModelFacts, gpu: GpuSpec, nodes: int, gpus_per_node: int, seq_len: int, stage: int,
              checkpointing: bool, micro_batch: int, accum: int, precision: str, efficiency: float,
              zero: ZeroSettings = ZeroSettings()) -> tuple[float, float]:
    """(compute seconds, exposed communication seconds) of one optimizer step (module docstring)."""
    from ..flops import hardware_training_flops

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
