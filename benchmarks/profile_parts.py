"""Where does bigbird-ja's CPU time go? Self time of every op, summed by part of the model.

Setup: the same two base layers as bench_cpu.py (bench_memory.build_model), batch 1, float32; one forward (no_grad,
`fwd`), one forward+backward of mean(last_hidden_state ** 2) in eval mode (`train`: no dropout) or in train mode with
the default dropout, 0.1 hidden and 0.1 attention (`step`: the training step users run), after two warm-up runs,
under torch.profiler. Ops are put
in parts by name (and, for bmm, by whether a dimension is the 2S = 512 relative buckets):

    projections + FFN              addmm, mm, gelu (and its backward)
    relative products              bmm with a 512 dimension (q.pos_key, k.pos_query and their gradients)
    relative reads, indices, sums  gather, scatter_add_, index, sub, add_, and the C kernel's calls (the self time
                                   of the bigbird_ja::relative_terms ops, of their autograd wrappers and of
                                   _KernelTerms, eager training's node)
    scores and context matmuls     the other bmm, baddbmm_, addmm_
    key/value block copies         index_select, index_add_
    softmax + masks                softmax and its backward, masked_fill_, where, index_put_
    attention dropout              on the attention probabilities: torch's dropout ops and every op under them
                                   (bernoulli_, native_dropout and its backward, the mask's mul), or the hashed
                                   dropout (bigbird_ja::hashed_dropout)
    hidden dropout                 the same ops on [.., hidden]-shaped activations (after embeddings, attention
                                   output and FFN: transformers' usual dropout, the same in every model)
    other                          everything else (layer norms, copies, views, autograd bookkeeping)

Run (from the repository root; PYTHONPATH=<another checkout> profiles that version with this script):
    MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_MMAP_THRESHOLD_=33554432 python benchmarks/profile_parts.py 1024 fwd
The malloc settings keep freed memory in the heap, so that page faults (see bench_cpu.py) do not blur the parts.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import HIDDEN, build_model, make_inputs  # noqa: E402

PARTS = ("projections + FFN", "relative products", "relative reads, indices, sums", "scores and context matmuls",
         "key/value block copies", "softmax + masks", "attention dropout", "hidden dropout", "other")
DROPOUT_OPS = ("aten::bernoulli_", "aten::native_dropout", "aten::native_dropout_backward", "aten::dropout")
# The native kernels' self time: the ops (cpu_kernels), the autograd node of eager training (blocked_terms), and the
# op's autograd wrapper, whose self time is the forward kernel's ("GeneratedBackwardFor_bigbird_ja_<op>...").
RELATIVE_KERNEL_EVENTS = ("bigbird_ja::relative_terms", "_KernelTerms")


def is_dropout(name: str) -> bool:
    return name.startswith("bigbird_ja::hashed_dropout") or "bigbird_ja_hashed_dropout" in name or name in DROPOUT_OPS


def part_of(name: str, shapes, dropout_shapes=None) -> str:
    """dropout_shapes: the input shapes of the dropout op this op runs in (itself or an ancestor), None outside."""
    if dropout_shapes is not None:
        first = dropout_shapes[0] if dropout_shapes else []
        return "hidden dropout" if first and first[-1] == HIDDEN else "attention dropout"
    if name in ("aten::addmm", "aten::mm", "aten::gelu", "aten::gelu_backward"):
        return "projections + FFN"
    if name == "aten::bmm" and any(512 in shape for shape in shapes if shape):
        return "relative products"
    if name in ("aten::gather", "aten::scatter_add_", "aten::index", "aten::sub", "aten::add_"):
        return "relative reads, indices, sums"
    if name.startswith(RELATIVE_KERNEL_EVENTS) or "bigbird_ja_relative_terms" in name:
        return "relative reads, indices, sums"
    if name in ("aten::bmm", "aten::baddbmm_", "aten::addmm_", "aten::baddbmm"):
        return "scores and context matmuls"
    if name in ("aten::index_select", "aten::index_add_"):
        return "key/value block copies"
    if name in ("aten::_softmax", "aten::_softmax_backward_data", "aten::masked_fill_", "aten::where",
                "aten::index_put_"):
        return "softmax + masks"
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("length", type=int)
    p.add_argument("mode", choices=["fwd", "train", "step"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch
    from torch.profiler import profile

    import bigbird_ja

    torch.set_num_threads(args.threads)
    model, inputs = build_model("blocked", args.length, layers=2), make_inputs(args.length)
    if args.mode == "step":
        model.train()

    def once():
        if args.mode == "fwd":
            with torch.no_grad():
                model(**inputs)
        else:
            model(**inputs).last_hidden_state.square().mean().backward()
            model.zero_grad(set_to_none=True)

    once()
    once()
    with profile(record_shapes=True) as prof:
        once()
    parts = collections.Counter()
    # an op under a dropout op (the mask's mul, the Bernoulli draw's fill) counts as dropout: attributed by ancestry
    parent = {}
    for event in prof.events():
        for child in event.cpu_children:
            parent[id(child)] = event

    def dropout_shapes(event):  # the outermost dropout op at or above event: its input shapes (None: no dropout)
        found = None
        while True:
            if is_dropout(event.name):
                found = event.input_shapes or []
            if id(event) not in parent:
                return found
            event = parent[id(event)]

    for event in prof.events():
        parts[part_of(event.name, event.input_shapes, dropout_shapes(event))] += max(event.self_cpu_time_total, 0) / 1e3
    print(f"# {bigbird_ja.__file__}: n={args.length} {args.mode}, 2 base layers, {args.threads} thread(s), ms")
    print("| part | ms |\n|---|---:|")
    for name in PARTS:
        print(f"| {name} | {parts[name]:.0f} |")
    print(f"| total | {sum(parts.values()):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
