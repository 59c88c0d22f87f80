"""Ahead-of-time compilation of the kernels for GPUs that are not present (no device needed).

`compile_kernel` lowers one kernel configuration to PTX and cubin for a CUDA target and returns its shared-memory
use, so a CPU-only CI catches what the interpreter cannot: lowering errors and configurations over the device's
shared-memory limit. It needs a process where TRITON_INTERPRET is unset (the interpreter replaces the kernels).
"""

from __future__ import annotations

import itertools

import torch

# Largest dynamic shared memory per block (bytes): A100 (sm_80) and H100 (sm_90).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
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


def compile_kernel(kernel_name: str, arch: int, dtype: torch.dtype, head_dim: int, layout_block: int,
                   block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 2,
                   has_c2p: bool = True, has_p2c: bool = True, has_dropout: bool = False):
    """Compile one configuration for sm_`arch`; returns the compiled kernel (`.asm`, `.metadata.shared`)."""
    import triton
    from triton.backends.compiler import GPUTarget
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
    source = ASTSource(KERNELS[kernel_name], signature, constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


# (dtype, head dim, layout block) of every kernel launch the GPU suite makes (benchmarks/gpu_suite.py: the bf16
# correctness test, the attention benchmark and the base model, all 12 heads x 64 with 64-token blocks).
SUITE_SHAPES = ((torch.bfloat16, 64, 64),)


def tuning_space(head_dim: int, layout_block: int, dtype: torch.dtype = torch.bfloat16, space: str | None = None):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may try after pruning, in `space` ("full" or
    "suite"; None: the one BIGBIRD_JA_AUTOTUNE selects)."""
    from .block_sparse import _configs, _prune

    element_size = torch.empty(0, dtype=dtype).element_size()
    kept = _prune(_configs(space), {}, HEAD_DIM=head_dim, LAYOUT_BLOCK=layout_block, ELEMENT_SIZE=element_size)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


def worst_cases(head_dim: int, layout_block: int, dtype: torch.dtype):
    """Per tile shape, the deepest pipeline with 4 warps: it bounds the shared memory of the shape's other
    configurations. Returns (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    deepest: dict[tuple[int, int], int] = {}
    for bm, bn, _, stages in tuning_space(head_dim, layout_block, dtype):
        deepest[(bm, bn)] = max(deepest.get((bm, bn), 0), stages)
    return [(bm, bn, 4, stages) for (bm, bn), stages in sorted(deepest.items())]


def sweep(archs=(80, 90), dtypes=(torch.bfloat16, torch.float32), head_dims=(32, 64, 128), layout_blocks=(128,),
          kernels=("forward", "backward_dq", "backward_dkdv"), largest_only=True):
    """Compile configurations; yield dicts with the shared memory each uses and the target's limit.

    largest_only keeps, per (kernel, dtype, head dim, layout block), the smallest tile (compiled without dropout)
    and the configuration with the largest shared-memory estimate (compiled with dropout, the heavier variant);
    otherwise every worst case per tile shape, with dropout.
    """
    for arch, kernel, dtype, head_dim, layout_block in itertools.product(archs, kernels, dtypes, head_dims,
                                                                          layout_blocks):
        configs = worst_cases(head_dim, layout_block, dtype)
        if largest_only:
            size = torch.empty(0, dtype=dtype).element_size()
            configs = sorted({configs[0], max(configs, key=lambda c: ((c[0] + c[1]) * head_dim * size * c[3], c))})
        for i, config in enumerate(configs):
            dropout = not (largest_only and i == 0 and len(configs) > 1)
            compiled = compile_kernel(kernel, arch, dtype, head_dim, layout_block, *config, has_dropout=dropout)
            yield dict(arch=arch, kernel=kernel, dtype=DTYPE_NAMES[dtype], head_dim=head_dim,
                       layout_block=layout_block, config=config, dropout=dropout, shared=compiled.metadata.shared,
                       limit=SHARED_MEMORY_LIMIT[arch])


def suite_sweep(archs=(90,), dropouts=(False, True)):
    """Compile every configuration the GPU suite's autotuner tries (BIGBIRD_JA_AUTOTUNE=suite) for each of its
    shapes, each kernel, with and without dropout; yield dicts as `sweep` does, with the Triton version."""
    import triton

    for arch, kernel, (dtype, head_dim, layout_block), dropout in itertools.product(
            archs, ("forward", "backward_dq", "backward_dkdv"), SUITE_SHAPES, dropouts):
        for config in tuning_space(head_dim, layout_block, dtype, space="suite"):
            compiled = compile_kernel(kernel, arch, dtype, head_dim, layout_block, *config, has_dropout=dropout)
            yield dict(arch=arch, kernel=kernel, dtype=DTYPE_NAMES[dtype], head_dim=head_dim,
                       layout_block=layout_block, config=config, dropout=dropout, shared=compiled.metadata.shared,
                       limit=SHARED_MEMORY_LIMIT[arch], triton=triton.__version__)


if __name__ == "__main__":  # python -m bigbird_ja_kernels.aot [--arch 80] [--all | --suite]: one JSON line per config
    import argparse
    import json

    parser = argparse.ArgumentParser(description="compile the kernels for CUDA targets; print shared memory")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--all", action="store_true", help="every dtype, layout block and tile shape")
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
                     largest_only=not args.all):
        print(json.dumps(row), flush=True)
