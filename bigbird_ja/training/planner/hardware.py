"""The GPUs a plan is for: memory, peak TFLOP/s and bus bandwidths of a device kind, and the planner's input checks.

Defaults per GPU kind (`GPUS`; `--memory-gib --peak-tflops --intra-node-gbps --inter-node-gbps` for anything else):
memory as sold (usable capacity); peak from `flops.PEAK_TFLOPS`; intra-node bus bandwidth: NCCL all-reduce bus
bandwidth of nccl-tests on DGX machines (A100 NVLink3 ~230 GB/s, H100/H200 NVLink4 ~370 GB/s); inter-node: the NICs
of a node at ~90% of line rate: A100 nodes with 4 x HDR 200 Gb/s (the layout of this project's presets and of
ABCI's A nodes) ~90 GB/s, H100/H200 nodes with 8 x NDR 400 Gb/s ~360 GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 2 ** 30


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
        from ..flops import peak_tflops

        if self.peak_tflops_override is not None:
            return self.peak_tflops_override
        return peak_tflops(self.peak_name, precision)


GPUS = {
    "a100-40gb": GpuSpec("A100 40GB SXM", 40.0, "A100", 230.0, 90.0),
    "a100-80gb": GpuSpec("A100 80GB SXM", 80.0, "A100", 230.0, 90.0),
    "h100": GpuSpec("H100 80GB SXM", 80.0, "H100", 370.0, 360.0),
    "h200": GpuSpec("H200 141GB SXM", 141.0, "H200", 370.0, 360.0),
}


# What the planner takes. Outside these ranges an input is a typo, not a machine, and the arithmetic would divide by
# zero or overflow into inf / nan figures: refused, naming the option (the CLI's; `preset_plan` reads the same
# options from a preset's `# plan-args:` line). The run's own limits are beside `plan_run`.
GPU_RANGES = {  # GpuSpec field: (option, lowest, highest)
    "memory_gib": ("--memory-gib", 1e-3, 1e6),
    "peak_tflops_override": ("--peak-tflops", 1e-3, 1e6),
    "intra_node_gbps": ("--intra-node-gbps", 1e-3, 1e6),
    "inter_node_gbps": ("--inter-node-gbps", 1e-3, 1e6),
}


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_number(option: str, value, lowest: float, highest: float, what: str) -> None:
    """``value`` is a finite number in [lowest, highest], else a ValueError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lowest <= value <= highest:
        raise ValueError(f"{option} {_shown(value)}: must be a number from {lowest:g} to {highest:g} ({what})")


def check_count(option: str, value, highest: int | None = None, what: str = "") -> None:
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
            check_number(option, value, lowest, highest, "GiB, TFLOP/s, GB/s of one GPU")
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


def gpu_kind(gpu: GpuSpec) -> str | None:
    """The `GPUS` key of a known device (how presets and commands name it), None for one given by its figures."""
    return next((k for k, v in GPUS.items() if v.name == gpu.name), None)
