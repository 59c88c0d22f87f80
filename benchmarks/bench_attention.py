"""How fast is the block-sparse disentangled attention op, per backend, as the sequence grows?

One question: forward and forward+backward time, throughput over the attended blocks, and peak memory of the
attention op alone (q, k, v and the relative projections given), for n = 1k .. 16k (32k where memory allows), for:

  triton      bigbird_ja's fused kernels (CUDA)
  blocked     bigbird_ja's pure-PyTorch blocked path
  reference   bigbird_ja's dense O(n^2) reference
  flex        FlexAttention computing the same function: a block mask from the same layout plus a score_mod that
              reads the same per-bucket projections (compiled), on the layout's block size with kernel_options
              tiles that divide it (Flex's default tiles on Hopper are 128 x 128, which a 64-token mask refuses)
  flex-128    the same with a 128-token block mask (the mask_mod stays exact to the token) and Flex's own tiles
  flex-backend           bigbird_ja's attention_backend="flex" as dispatched: compiled on CUDA (the flex-128
                         construction), uncompiled on CPU (Flex's dense math, forward only)
  flex-backend-compiled  the same compiled on CPU (inductor's CPU Flex kernel, forward only); CPU only
  hf-deberta  transformers' DebertaV2 DisentangledSelfAttention (dense, includes its q/k/v projections)
  sdpa        dense scaled_dot_product_attention without relative terms: a speed-of-light line

FLOPs are counted over the attended blocks (A = attended (query block, key block) pairs summed over heads):
  forward  = B * A * bs^2 * 4 * D  +  B * H * Np * 2S * D * 2 * (number of relative terms)
  backward = 2.5 * forward (the usual 5 matmuls to the forward's 2)
Dense cases count A = H * nb^2 (their full matrix). TFLOP/s = FLOPs / time; with --peak-tflops (a measured bf16
matmul peak) each row also gives the fraction of that peak.

Defaults: on CUDA 12 heads x 64, bfloat16, batch 8, block 64 (window 3, global 2, random 3); on CPU 12 x 64,
float32, batch 1 and n up to 4k (triton there only with --interpret, which is far too slow to time).

Run:  python benchmarks/bench_attention.py [--lengths 1024 2048 ...] [--cases triton blocked ...] [--out PATH]
It prints a markdown table and writes JSON (with an environment block; rewritten after every row, so an
interrupted run keeps what finished) and a PNG beside it. A case that fails or runs out of memory is recorded, not
fatal. On CPU, triton runs only with --interpret and flex / flex-128 only uncompiled then (a stand-in, not a
timing); the flex-backend cases are timed there, forward only (torch has no Flex backward on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import bigbird_ja
from bigbird_ja.attention import RelativePositionSpec, disentangled_attention, layout_for, relative_index_table
from bigbird_ja.common.atomic_io import atomic_write_text

ALL_CASES = ("triton", "blocked", "reference", "flex", "flex-128", "flex-backend", "flex-backend-compiled",
             "hf-deberta", "sdpa")


def make_config(args, length):
    return bigbird_ja.BigBirdJaConfig(
        hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads, num_hidden_layers=1,
        max_position_embeddings=max(length, 4096), block_size=args.block_size, num_window_blocks=3,
        num_global_blocks=2, num_random_blocks=3, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


def attended_block_pairs(case, config, length):
    layout = layout_for(config, 0, length)
    if case in ("reference", "hf-deberta", "sdpa"):
        return config.num_attention_heads * layout.num_blocks ** 2
    return layout.attended_blocks()


def flops(case, config, length, batch):
    bs, D, H = config.block_size, config.attention_head_size, config.num_attention_heads
    Np = layout_for(config, 0, length).num_blocks * bs
    forward = batch * attended_block_pairs(case, config, length) * bs * bs * 4 * D
    if case != "sdpa":
        forward += batch * H * Np * 2 * config.relative_span * D * 2 * 2
    return forward, 2.5 * forward


def build_case(case, config, length, batch, dtype, device):
    """Return (forward closure, tensors needing gradients)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    H, D, S = config.num_attention_heads, config.attention_head_size, config.relative_span

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(True)

    q, k, v = rand(batch, H, length, D), rand(batch, H, length, D), rand(batch, H, length, D)
    pos_key, pos_query = rand(H, 2 * S, D), rand(H, 2 * S, D)
    padding = torch.ones(batch, length, dtype=torch.bool, device=device)
    scale = 1.0 / math.sqrt(3 * D)
    spec = RelativePositionSpec.from_config(config)
    layout = layout_for(config, 0, length)

    if case in ("triton", "blocked", "reference"):
        def run():
            return disentangled_attention(q, k, v, layout, padding, scale, pos_key, pos_query, spec, backend=case)
        return run, [q, k, v, pos_key, pos_query]
    if case in ("flex-backend", "flex-backend-compiled"):
        from bigbird_ja.attention.flex_backend import flex_attention_backend

        compiled = True if case == "flex-backend-compiled" else None

        def run():
            return flex_attention_backend(q, k, v, layout, padding, scale, pos_key, pos_query, spec,
                                          compiled=compiled)
        return run, [q, k, v, pos_key, pos_query]
    if case == "sdpa":
        def run():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return run, [q, k, v]
    if case == "hf-deberta":
        from transformers import DebertaV2Config
        from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention, build_relative_position

        hf_config = DebertaV2Config(hidden_size=H * D, num_attention_heads=H, relative_attention=True,
                                    position_buckets=config.position_buckets,
                                    max_relative_positions=config.effective_max_relative_positions,
                                    pos_att_type="p2c|c2p", share_att_key=True, attention_probs_dropout_prob=0.0,
                                    hidden_dropout_prob=0.0, max_position_embeddings=length)
        module = DisentangledSelfAttention(hf_config).to(device, dtype)
        hidden = rand(batch, length, H * D)
        rel_embeddings = rand(2 * S, H * D)
        mask = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device)
        relative_pos = build_relative_position(hidden, hidden, bucket_size=config.position_buckets,
                                               max_position=config.effective_max_relative_positions)

        def run():
            return module(hidden, mask, relative_pos=relative_pos, rel_embeddings=rel_embeddings)[0]
        return run, [hidden, rel_embeddings]
    if case in ("flex", "flex-128"):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        bs = config.block_size
        mask_block = 128 if case == "flex-128" else bs
        blocks = layout.block_mask().to(device)  # [H, nb, nb]
        Np = layout.num_blocks * bs
        table = relative_index_table(Np, spec, device)
        offset = Np - 1
        q_s = (q * scale).detach().requires_grad_(True)
        qp = (q_s @ pos_key.transpose(-1, -2)).detach().requires_grad_(True)  # [B, H, n, 2S]
        kp = (k @ (pos_query * scale).transpose(-1, -2)).detach().requires_grad_(True)

        def mask_mod(b, h, q_idx, kv_idx):
            return blocks[h, q_idx // bs, kv_idx // bs] & padding[b, kv_idx]

        def score_mod(score, b, h, q_idx, kv_idx):
            bucket = table[q_idx - kv_idx + offset]
            return score + qp[b, h, q_idx, bucket] + kp[b, h, kv_idx, bucket]

        block_mask = create_block_mask(mask_mod, batch, H, length, length, device=device, BLOCK_SIZE=mask_block)
        # Tiles must divide the mask's blocks: forward BLOCK_M x BLOCK_N, backward dk/dv (M1 x N1) and dq (M2 x N2)
        options = ({"BLOCK_M": bs, "BLOCK_N": bs, "BLOCK_M1": bs // 2, "BLOCK_N1": bs, "BLOCK_M2": bs,
                    "BLOCK_N2": bs // 2} if case == "flex" else None)
        # compiled on CUDA; elsewhere (the suite's CPU stand-in) eager, which checks the mask and score_mod only
        attend = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
        if device.type != "cuda":  # Flex refuses inputs that need gradients on CPU
            q_s, k, v, qp, kp = (t.detach() for t in (q_s, k, v, qp, kp))

        def run():
            return attend(q_s, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0, kernel_options=options)
        return run, [q_s, k, v, qp, kp]
    raise ValueError(case)


def time_it(fn, repeats, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(case, config, length, args, device, dtype):
    if case == "triton" and device.type != "cuda" and not args.interpret:
        return {"status": "skipped: triton needs CUDA (or --interpret, too slow to time)"}
    if case in ("flex", "flex-128") and device.type != "cuda" and not args.interpret:
        return {"status": "skipped: FlexAttention is timed on CUDA only here (uncompiled with --interpret)"}
    if case == "flex-backend-compiled" and device.type == "cuda":
        return {"status": "skipped: on CUDA flex-backend is the compiled one"}
    estimate = 4 * args.batch * config.num_attention_heads * length * length * torch.empty(0, dtype=dtype).element_size()
    dense = ("reference", "hf-deberta") + (("flex-backend",) if device.type != "cuda" else ())
    if case in dense and estimate > args.memory_budget_gib * 2**30:
        return {"status": f"skipped: dense scores need ~{estimate / 2**30:.0f} GiB > budget"}
    try:
        run, leaves = build_case(case, config, length, args.batch, dtype, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            forward_s = time_it(run, args.repeats, device)
        grad_out = None

        def forward_backward():
            nonlocal grad_out
            out = run()
            if grad_out is None:
                grad_out = torch.randn_like(out)
            torch.autograd.grad(out, leaves, grad_out, allow_unused=True)

        # Flex has no CPU backward: the CPU stand-in checks its forward only. A backward that fails keeps the
        # forward's numbers (Flex's backward may find no default tiles dividing a 64-token mask block on Hopper).
        total_s, backward_status = None, "skipped: no FlexAttention backward on CPU"
        if not (case.startswith("flex") and device.type != "cuda"):
            try:
                total_s, backward_status = time_it(forward_backward, args.repeats, device), "ok"
            except Exception as err:  # recorded, not fatal
                backward_status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        check = {}
        if case == "triton" or case.startswith("flex"):  # a fast path is as good as its agreement with the reference
            with torch.no_grad():
                blocked_run, _ = build_case("blocked", config, length, args.batch, dtype, device)
                check["max_abs_diff_vs_blocked"] = (run().float() - blocked_run().float()).abs().max().item()
    except Exception as err:  # recorded, not fatal (compiler errors included: triton and inductor raise their own)
        return {"status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    fwd_flops, bwd_flops = flops(case, config, length, args.batch)
    row = {"status": "ok", "forward_ms": forward_s * 1e3, "forward_tflops": fwd_flops / forward_s / 1e12,
           "backward_status": backward_status, "forward_backward_ms": None, "forward_backward_tflops": None,
           "peak_mib": peak, **check}
    if total_s is not None:
        row.update(forward_backward_ms=total_s * 1e3, forward_backward_tflops=(fwd_flops + bwd_flops) / total_s / 1e12)
    if args.peak_tflops:
        row["forward_fraction_of_peak"] = row["forward_tflops"] / args.peak_tflops
        if total_s is not None:
            row["forward_backward_fraction_of_peak"] = row["forward_backward_tflops"] / args.peak_tflops
    return row


def environment(device):
    import transformers
    from envinfo import cpu_description, provenance

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
           f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "cpu": cpu_description(), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, **provenance()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for case in sorted({r["case"] for r in results}):
        rows = [r for r in results if r["case"] == case and r["status"] == "ok" and r["forward_backward_ms"]]
        if rows:
            axes[0].loglog([r["length"] for r in rows], [r["forward_backward_ms"] for r in rows], "o-", label=case)
            axes[1].semilogx([r["length"] for r in rows], [r["forward_backward_tflops"] for r in rows], "o-",
                             label=case)
    axes[0].set(xlabel="tokens", ylabel="forward+backward ms", title="time")
    axes[1].set(xlabel="tokens", ylabel="TFLOP/s over attended blocks", title="throughput")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768] if cuda else [1024, 2048, 4096])
    parser.add_argument("--cases", nargs="+", choices=ALL_CASES, default=list(ALL_CASES))
    parser.add_argument("--batch", type=int, default=8 if cuda else 1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32",
                        choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=10 if cuda else 2)
    parser.add_argument("--memory-budget-gib", type=float, default=60.0 if cuda else 12.0)
    parser.add_argument("--interpret", action="store_true", help="run triton (TRITON_INTERPRET=1) and flex "
                        "(uncompiled) on CPU: a stand-in that exercises the code, not a timing")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="measured bf16 matmul peak (TFLOP/s): rows then give their fraction of it")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/attention.json)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    env = environment(device)
    folder = env["device"].split(" (")[0].lower().replace(" ", "-") if cuda else "cpu-2core"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / folder / "attention.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    results = []
    report = {"question": "attention op time, throughput and memory per backend vs length",
              "flop_formula": __doc__.split("FLOPs are counted")[1].split("Defaults:")[0].strip(),
              "settings": vars(args), "environment": env, "results": results}
    print(f"{env['device']}, {args.dtype}, batch {args.batch}, {args.heads} heads x {args.head_dim}, block "
          f"{args.block_size}\n")
    print("| tokens | case | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | peak MiB | status |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for length in args.lengths:
        config = make_config(args, length)
        for case in args.cases:
            row = {"case": case, "length": length, **measure(case, config, length, args, device, dtype)}
            results.append(row)
            if row["status"] == "ok":
                peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "n/a"
                check = f" (max diff vs blocked {row['max_abs_diff_vs_blocked']:.1e})" if "max_abs_diff_vs_blocked" \
                    in row else ""
                if row["backward_status"] != "ok":
                    check += f" (backward {row['backward_status']})"
                if "forward_backward_fraction_of_peak" in row:
                    check += f" ({row['forward_backward_fraction_of_peak']:.0%} of measured peak fwd+bwd)"
                both = ("n/a", "n/a") if row["forward_backward_ms"] is None else (
                    f"{row['forward_backward_ms']:.2f}", f"{row['forward_backward_tflops']:.3g}")
                print(f"| {length} | {case} | {row['forward_ms']:.2f} | {both[0]} | {row['forward_tflops']:.3g} | "
                      f"{both[1]} | {peak} | ok{check} |")
            else:
                print(f"| {length} | {case} | | | | | | {row['status']} |")
            sys.stdout.flush()
            atomic_write_text(out, json.dumps(report, indent=2), durable=False)  # what finished survives a kill
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
