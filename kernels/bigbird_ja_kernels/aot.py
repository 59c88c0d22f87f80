"""Ahead-of-time compilation of the kernels for GPUs that are not present (no device needed).

`compile_kernel` lowers one kernel configuration to PTX and cubin for a CUDA target and returns its shared-memory
use, so a CPU-only CI catches what the interpreter cannot: lowering errors and configurations over the device's
shared-memory limit. `shared_memory` gives the same figure from Triton's front end and shared-memory allocation
alone (no LLVM, no ptxas: about a tenth of a compile); the autotuner uses it to drop configurations a device
cannot launch. Both need a process where TRITON_INTERPRET is unset (the interpreter replaces the kernels).
"""

from __future__ import annotations

import functools
import itertools

import torch

# Largest dynamic shared memory per block (bytes): the CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability", maximum shared memory per thread block: 163 KB on 8.0 (A100), 227 KB on 9.0 (H100) and
# 10.0 (B200), 99 KB on 8.6, 8.9 and 12.0 (RTX 30xx/40xx/50xx, L4, L40, RTX PRO 6000 Blackwell).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448, 100: 232448, 120: 101376}
ARCHS = tuple(SHARED_MEMORY_LIMIT)
KERNEL_NAMES = ("forward", "backward_dq", "backward_dkdv")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

_POINTER_ARGS = {
    # argument name -> which dtype it holds ("x": the input dtype)
    "forward": dict(Q="x", K="x", V="x", QP="x", KP="x", REL_TABLE="i32", KEY_VALID="i8", ROW_PTR="i32",
                    COL_IDX="i32", OUT="x", LSE="fp32"),
    "backward_dq": dict(Q="x", K="x", V="x", QP="x", KP="x", REL_TABLE="i32", KEY_VALID="i8", ROW_PTR="i32",
                        COL_IDX="i32", DO="x", LSE="fp32", DELTA="fp32", DQ="x", DQP="fp32"),
    "backward_dkdv": dict(Q="x", K="x", V="x", QP="x", KP="x", REL_TABLE="i32", KEY_VALID="i8", T_ROW_PTR="i32",
                          T_COL_IDX="i32", DO="x", LSE="fp32", DELTA="fp32", DK="x", DV="x", DKP="fp32"),
}
_SCALAR_ARGS = {"H": "i32", "N_PAD": "i32", "NUM_BLOCKS": "i32", "TWO_S": "i32", "TABLE_OFFSET": "i32",
                "seed": "i32", "dropout_p": "fp32"}


def _source(kernel_name: str, dtype: torch.dtype, head_dim: int, layout_block: int, block_m: int, block_n: int,
            has_c2p: bool, has_p2c: bool, has_dropout: bool):
    from triton.compiler import ASTSource

    from .block_sparse import KERNELS, input_precision, interpreting

    if interpreting():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (the interpreter replaces the "
                           "kernels with Python functions).")
    x = DTYPE_NAMES[dtype]
    signature = {name: "*" + (x if kind == "x" else kind) for name, kind in _POINTER_ARGS[kernel_name].items()}
    signature.update(_SCALAR_ARGS)
    constexprs = dict(HEAD_DIM=head_dim, LAYOUT_BLOCK=layout_block, HAS_C2P=has_c2p, HAS_P2C=has_p2c,
                      HAS_DROPOUT=has_dropout, INPUT_PRECISION=input_precision(dtype), BLOCK_M=block_m,
                      BLOCK_N=block_n)
    signature.update({name: "constexpr" for name in constexprs})
    return ASTSource(KERNELS[kernel_name], signature, constexprs)


def compile_kernel(kernel_name: str, arch: int, dtype: torch.dtype, head_dim: int, layout_block: int,
                   block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 2,
                   has_c2p: bool = True, has_p2c: bool = True, has_dropout: bool = False):
    """Compile one configuration for sm_`arch`; returns the compiled kernel (`.asm`, `.metadata.shared`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    source = _source(kernel_name, dtype, head_dim, layout_block, block_m, block_n, has_c2p, has_p2c, has_dropout)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


@functools.lru_cache(maxsize=None)
def shared_memory(kernel_name: str, arch: int, dtype: torch.dtype, head_dim: int, layout_block: int,
                  block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 2,
                  has_c2p: bool = True, has_p2c: bool = True, has_dropout: bool = False) -> int:
    """The shared memory (bytes) `compile_kernel(...).metadata.shared` reports, without LLVM or ptxas: Triton's
    front end to TTGIR, then the start of the CUDA backend's make_llir up to its shared-memory allocation pass
    (the sweep test checks the figure against full compiles on every target)."""
    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptx_version_from_options
    from triton.compiler.compiler import make_backend

    source = _source(kernel_name, dtype, head_dim, layout_block, block_m, block_n, has_c2p, has_p2c, has_dropout)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages, **source.parse_options()))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                            context)
    stages, metadata = {}, {}
    backend.add_stages(stages, options, source.language)
    module = stages["ttgir"](stages["ttir"](module, metadata), metadata)
    pm = ir.pass_manager(module.context)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm, False)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, arch, get_ptx_version_from_options(options, arch))
    pm.run(module, "shared_memory")
    return module.get_int_attr("ttg.shared")


# (dtype, head dim, layout block) of every kernel launch the GPU suite makes (benchmarks/gpu_suite.py: the bf16
# correctness test, the attention benchmark and the base model, all 12 heads x 64 with 64-token blocks).
SUITE_SHAPES = ((torch.bfloat16, 64, 64),)


def tuning_space(head_dim: int, layout_block: int, dtype: torch.dtype = torch.bfloat16, space: str | None = None,
                 arch: int | None = None, kernel: str | None = None):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may try after pruning, in `space` ("full" or
    "suite"; None: the one BIGBIRD_JA_AUTOTUNE selects); with `arch` and `kernel`, as on that target (without
    the configurations over its shared-memory limit)."""
    from .block_sparse import _configs, _prune

    target = (arch, SHARED_MEMORY_LIMIT[arch]) if arch is not None else None
    kept = _prune(_configs(space), {}, kernel=kernel if arch is not None else None, HEAD_DIM=head_dim,
                  LAYOUT_BLOCK=layout_block, DTYPE=dtype, TARGET=target, HAS_C2P=True, HAS_P2C=True,
                  HAS_DROPOUT=True)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


def worst_cases(head_dim: int, layout_block: int, dtype: torch.dtype):
    """Per tile shape, the deepest pipeline with 4 warps: it bounds the shared memory of the shape's other
    configurations. Returns (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    deepest: dict[tuple[int, int], int] = {}
    for bm, bn, _, stages in tuning_space(head_dim, layout_block, dtype):
        deepest[(bm, bn)] = max(deepest.get((bm, bn), 0), stages)
    return [(bm, bn, 4, stages) for (bm, bn), stages in sorted(deepest.items())]


def extremes(dtype: torch.dtype, layout_block: int = 128, head_dims=(32, 64, 128)):
    """(head dim, config) pairs whose shared memory bounds every configuration of the space at these head dims:
    per tile shape, the deepest pipeline at each head dim, less those a larger head dim pipelines as deep
    (shared memory grows with head dim and stages; 4 warps as in `worst_cases`)."""
    found = {(head_dim, config) for head_dim in head_dims for config in worst_cases(head_dim, layout_block, dtype)}
    return sorted((d, c) for d, c in found
                  if not any(d2 > d and c2[:2] == c[:2] and c2[3] >= c[3] for d2, c2 in found))


def sweep(archs=ARCHS, dtypes=(torch.bfloat16, torch.float32), layout_blocks=(128,), kernels=KERNEL_NAMES,
          compile_all=False):
    """Check every target; yield one dict per configuration with its shared memory and the target's limit.

    For each (target, kernel, dtype, layout block): the shared memory of every `extremes` configuration (from
    `shared_memory`, with dropout, the heavier variant), and whether the target's autotuning space keeps it;
    then full compiles (lowering to a cubin): the smallest tile without dropout (16-bit dtypes), the heaviest
    configuration kept and the lightest dropped (with dropout), each also measured by `shared_memory` (row
    "fast") to check it. compile_all compiles every extreme configuration, and the smallest for every dtype.
    """
    import triton

    from .block_sparse import _prune

    for arch, kernel, dtype, layout_block in itertools.product(archs, kernels, dtypes, layout_blocks):
        limit = SHARED_MEMORY_LIMIT[arch]
        base = dict(arch=arch, kernel=kernel, dtype=DTYPE_NAMES[dtype], layout_block=layout_block, limit=limit)
        measured = []
        for head_dim, config in extremes(dtype, layout_block):
            shared = shared_memory(kernel, arch, dtype, head_dim, layout_block, *config, has_dropout=True)
            candidate = [triton.Config({"BLOCK_M": config[0], "BLOCK_N": config[1]}, num_warps=config[2],
                                       num_stages=config[3])]
            # what the autotuner on this target would do with it (its shared memory is cached by now)
            kept = _prune(candidate, {}, kernel=kernel, HEAD_DIM=head_dim, LAYOUT_BLOCK=layout_block, DTYPE=dtype,
                          TARGET=(arch, limit), HAS_C2P=True, HAS_P2C=True, HAS_DROPOUT=True) == candidate
            measured.append((shared, head_dim, config, kept))
            yield dict(base, head_dim=head_dim, config=config, dropout=True, shared=shared, kept=kept, stage="shared")
        smallest = min(measured, key=lambda m: (m[2][0] * m[2][1], m[2][3], m[1]))
        to_compile = []
        if dtype != torch.float32 or compile_all:  # the variant without dropout: one dtype's tensor-core path
            to_compile.append(("smallest", smallest[1], smallest[2], False))
        if compile_all:
            to_compile += [("kept" if k else "dropped", d, c, True) for _, d, c, k in measured]
        else:
            to_compile += [("heaviest kept", d, c, True) for _, d, c, _ in (max(m for m in measured if m[3]),)]
            to_compile += [("lightest dropped", d, c, True) for _, d, c, _ in sorted(m for m in measured
                                                                                    if not m[3])[:1]]
        for role, head_dim, config, dropout in to_compile:
            compiled = compile_kernel(kernel, arch, dtype, head_dim, layout_block, *config, has_dropout=dropout)
            fast = shared_memory(kernel, arch, dtype, head_dim, layout_block, *config, has_dropout=dropout)
            yield dict(base, head_dim=head_dim, config=config, dropout=dropout, shared=compiled.metadata.shared,
                       fast=fast, stage="cubin", role=role)


def suite_sweep(archs=(90,), dropouts=(False, True)):
    """Compile every configuration the GPU suite's autotuner tries (BIGBIRD_JA_AUTOTUNE=suite) for each of its
    shapes, each kernel, with and without dropout; yield dicts as `sweep` does, with the Triton version."""
    import triton

    for arch, kernel, (dtype, head_dim, layout_block), dropout in itertools.product(
            archs, KERNEL_NAMES, SUITE_SHAPES, dropouts):
        for config in tuning_space(head_dim, layout_block, dtype, space="suite"):
            compiled = compile_kernel(kernel, arch, dtype, head_dim, layout_block, *config, has_dropout=dropout)
            yield dict(arch=arch, kernel=kernel, dtype=DTYPE_NAMES[dtype], head_dim=head_dim,
                       layout_block=layout_block, config=config, dropout=dropout, shared=compiled.metadata.shared,
                       limit=SHARED_MEMORY_LIMIT[arch], triton=triton.__version__)


# python -m bigbird_ja_kernels.aot [--arch 80 120] [--all | --suite]: one JSON line per configuration
if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="compile the kernels for CUDA targets; print shared memory")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--all", action="store_true", help="every dtype and layout block; compile every extreme")
    parser.add_argument("--suite", action="store_true", help="every configuration the GPU suite tunes")
    parser.add_argument("--dropout", choices=["both", "off", "on"], default="both",
                        help="--suite: the variants to compile (to split the work between processes)")
    args = parser.parse_args()
    if args.suite:
        dropouts = {"both": (False, True), "off": (False,), "on": (True,)}[args.dropout]
        for row in suite_sweep(archs=tuple(args.arch), dropouts=dropouts):
            print(json.dumps(row), flush=True)
        raise SystemExit(0)
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if args.all else (torch.bfloat16, torch.float32)
    for row in sweep(archs=tuple(args.arch), dtypes=dtypes, layout_blocks=(32, 64, 128) if args.all else (128,),
                     compile_all=args.all):
        print(json.dumps(row), flush=True)
