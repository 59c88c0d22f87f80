"""The native op of the relative terms (bigbird_ja/attention/csrc/relative_terms.c, built by the install) against its
definition, written out with plain indexing, on random tables and block lists; the op's registration (fake,
autograd) and the path taken without it. (The blocked backend with and without it is compared with the dense
reference in test_attention_backends.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigbird_ja.attention import RelativePositionSpec, cpu_kernels, disentangled_attention, layout_for
from bigbird_ja.attention.relative import relative_index_table
from conftest import tiny_config
from test_attention_backends import make_inputs


ROOT = Path(__file__).resolve().parents[1]
BUILT = os.environ.get("BIGBIRD_JA_NO_NATIVE", "0") in ("", "0")  # what the install was asked for


@pytest.fixture(scope="module")
def kernel():
    if cpu_kernels.KERNEL is None:
        if BUILT:
            pytest.fail(f"the install did not build the native op: {cpu_kernels._WHY_NOT}")
        pytest.skip("installed with BIGBIRD_JA_NO_NATIVE=1")
    return cpu_kernels.KERNEL


def terms_by_definition(qp, kp, table, kblocks, H, q_block0, nq, bs, hw):
    """terms[p, n, a, s*bs + c] = qp[p, i, R-1-delta] + kp[p, (kb+hw)*bs + c, delta], one index op per term."""
    P, Np, R = (qp if qp is not None else kp).shape[0], table.numel() // 2 + 1, (qp if qp is not None else kp).shape[-1]
    kblocks = kblocks.expand(H, nq, -1)
    K = kblocks.shape[-1]
    i = ((q_block0 + torch.arange(nq))[:, None] * bs + torch.arange(bs))[:, :, None, None]  # [nq, bs, 1, 1]
    out = []
    for p in range(P):
        kb = kblocks[p % H][:, None, :, None]  # [nq, 1, K, 1]
        j = kb * bs + torch.arange(bs)  # [nq, 1, K, bs]
        delta = table[i - j + Np - 1]  # [nq, bs, K, bs]
        term = 0
        if qp is not None:
            term = term + qp[p][i.expand_as(delta), R - 1 - delta]
        if kp is not None:
            term = term + kp[p][(j + hw * bs).expand_as(delta), delta]
        out.append(term.reshape(nq, bs, K * bs))
    return torch.stack(out)


CASES = {  # (B, H, bs, nb, q_block0, K, hw, table): a RelativePositionSpec, or "random" (any delta per distance)
    # exact up to 16 and clamped from 15 on: tiles of each kind (SHIFT near, CONSTANT far, GENERAL between)
    "clamped buckets, sparse rows": (2, 3, 8, 9, 2, 6, 1, RelativePositionSpec(16, 32, 40)),
    # exact up to 4 only, log beyond: every tile GENERAL, with steps of 0 and 1
    "log buckets, one row block per head": (1, 2, 16, 7, 1, 4, 0, RelativePositionSpec(16, 8, 24)),
    "random table": (1, 2, 8, 6, 1, 5, 1, "random"),
}


def tile_kinds(table, bs):
    """The kinds (shift, constant, general) of the tiles at every block distance, as the kernel tells them."""
    Np = table.numel() // 2 + 1
    kinds = set()
    for e in range(-(Np // bs - 1), Np // bs):
        steps = torch.diff(table[e * bs + Np - 1 - (bs - 1):e * bs + Np - 1 + bs])
        kinds.add("shift" if bool((steps == 1).all()) else "constant" if bool((steps == 0).all()) else "general")
    return kinds


def test_the_cases_cover_every_kind_of_tile():
    _, _, table, _, kw = make_case("clamped buckets, sparse rows", torch.float64)
    assert tile_kinds(table, kw["bs"]) == {"shift", "constant", "general"}


def make_case(name, dtype, seed=0):
    B, H, bs, nb, q_block0, K, hw, table_kind = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    S = 16
    Np, R, T = nb * bs, 2 * S, (nb + 2 * hw) * bs
    if table_kind == "random":  # any delta: steps of any size, not monotone (only the per-element lookup is right)
        table = torch.randint(0, R, (2 * Np - 1,), generator=gen)
    else:
        table = relative_index_table(Np, table_kind)
    qp = torch.randn(B * H, Np, R, generator=gen, dtype=dtype)
    kp = torch.randn(B * H, T, R, generator=gen, dtype=dtype)
    kblocks = torch.randint(0, nb, (H, nb - q_block0, K), generator=gen)
    return qp, kp, table, kblocks, dict(H=H, q_block0=q_block0, bs=bs, hw=hw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("terms", ["both", "c2p", "p2c"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_forward_and_backward_match_the_definition(kernel, name, terms, dtype):
    """Forward: the sum of the two reads in the dtype (bf16: one rounding, as PyTorch's add), so float64 and bf16 agree
    exactly. Backward: against the definition's gradients in float64 (bf16: within its rounding of each store)."""
    qp, kp, table, kblocks, kw = make_case(name, dtype)
    qp = None if terms == "p2c" else qp
    kp = None if terms == "c2p" else kp
    nq, K, bs = kblocks.shape[1], kblocks.shape[2], kw["bs"]
    src = qp if qp is not None else kp
    out = torch.empty(src.shape[0], nq, bs, K * bs, dtype=dtype)
    kernel.forward(qp, kp, out, table, kblocks, **kw)
    exact = dict(rtol=0, atol=0) if dtype != torch.float32 else dict(rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out, terms_by_definition(qp, kp, table, kblocks, nq=nq, **kw), **exact)

    leaves = [t.double().requires_grad_() if t is not None else None for t in (qp, kp)]
    expected = terms_by_definition(*leaves, table, kblocks, nq=nq, **kw)
    grad = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    expected.backward(grad.double())
    gqp = None if qp is None else torch.zeros_like(qp)
    gkp = None if kp is None else torch.zeros_like(kp)
    kernel.backward(grad, gqp, gkp, table, kblocks, **kw)
    for got, leaf in zip((gqp, gkp), leaves):
        if leaf is not None:
            scale = leaf.grad.abs().max().item()
            tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] * scale
            torch.testing.assert_close(got.double(), leaf.grad, rtol=0, atol=tol)


def test_kernel_backward_overwrites_or_adds_as_asked(kernel):
    """zero=True: the gradients' contents are ignored (NaN here), every element written, halo rows and rows no tile
    reads included; zero=False: added to what is there."""
    qp, kp, table, kblocks, kw = make_case("clamped buckets, sparse rows", torch.float64)
    nq, K, bs = kblocks.shape[1], kblocks.shape[2], kw["bs"]
    grad = torch.randn(qp.shape[0], nq, bs, K * bs, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = torch.zeros_like(qp), torch.zeros_like(kp)
    kernel.backward(grad, *expected, table, kblocks, **kw)
    fresh = torch.full_like(qp, float("nan")), torch.full_like(kp, float("nan"))
    kernel.backward(grad, *fresh, table, kblocks, **kw, zero=True)
    for got, want in zip(fresh, expected):
        assert torch.equal(got, want)
    before = torch.randn_like(qp), torch.randn_like(kp)
    added = [t.clone() for t in before]
    kernel.backward(grad, *added, table, kblocks, **kw)
    for got, start, want in zip(added, before, expected):
        torch.testing.assert_close(got, start + want, rtol=0, atol=1e-12)


def test_kernel_reads_one_block_list_for_every_head_and_row(kernel):
    """kblocks [1, 1, K] (the dense rows: every key block) stands for every head and query block."""
    qp, kp, table, _, kw = make_case("clamped buckets, sparse rows", torch.float64)
    nb, nq = qp.shape[1] // kw["bs"], 3
    every = torch.arange(nb).view(1, 1, nb)
    out = torch.empty(qp.shape[0], nq, kw["bs"], nb * kw["bs"], dtype=torch.float64)
    kernel.forward(qp, kp, out, table, every, **{**kw, "q_block0": 0})
    expected = terms_by_definition(qp, kp, table, every, nq=nq, **{**kw, "q_block0": 0})
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_kernel_gives_the_same_result_on_any_number_of_threads(kernel):
    qp, kp, table, kblocks, kw = make_case("clamped buckets, sparse rows", torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            out = torch.empty(qp.shape[0], kblocks.shape[1], kw["bs"], kblocks.shape[2] * kw["bs"],
                              dtype=torch.float64)
            kernel.forward(qp, kp, out, table, kblocks, **kw)
            gqp, gkp = torch.zeros_like(qp), torch.zeros_like(kp)
            kernel.backward(out, gqp, gkp, table, kblocks, **kw)
            results.append((out, gqp, gkp))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kernel_takes_only_what_it_supports():
    assert cpu_kernels.supports(torch.empty(1, dtype=torch.float32))
    assert cpu_kernels.supports(torch.empty(1, dtype=torch.float64))
    assert cpu_kernels.supports(torch.empty(1, dtype=torch.bfloat16))
    assert not cpu_kernels.supports(torch.empty(1, dtype=torch.float16))
    assert not cpu_kernels.supports(torch.empty(1, device="meta"))


def test_kernel_refuses_layouts_it_would_misread(kernel):
    qp, kp, table, kblocks, kw = make_case("clamped buckets, sparse rows", torch.float64)
    out = torch.empty(qp.shape[0], kblocks.shape[1], kw["bs"], kblocks.shape[2] * kw["bs"], dtype=torch.float64)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.forward(qp.transpose(1, 2).contiguous().transpose(1, 2), kp, out, table, kblocks, **kw)
    with pytest.raises(ValueError, match="one dtype"):
        kernel.forward(qp.float(), kp, out, table, kblocks, **kw)
    with pytest.raises(ValueError, match="int64"):
        kernel.forward(qp, kp, out, table.int(), kblocks, **kw)
    with pytest.raises(ValueError, match="both None"):
        kernel.backward(out, None, None, table, kblocks, **kw)


def test_kernel_refuses_bounds_it_would_overrun(kernel):
    """The C code reads where the block numbers and the table say: anything out of range is refused first."""
    qp, kp, table, kblocks, kw = make_case("clamped buckets, sparse rows", torch.float64)
    nb = qp.shape[1] // kw["bs"]
    out = torch.empty(qp.shape[0], kblocks.shape[1], kw["bs"], kblocks.shape[2] * kw["bs"], dtype=torch.float64)
    bad_blocks = kblocks.clone()
    bad_blocks[0, 0, 0] = nb
    with pytest.raises(ValueError, match="key blocks outside"):
        kernel.forward(qp, kp, out, table, bad_blocks, **kw)
    bad_table = table.clone()
    bad_table[3] = qp.shape[-1]
    with pytest.raises(ValueError, match="deltas outside"):
        kernel.forward(qp, kp, out, bad_table, kblocks, **kw)
    with pytest.raises(ValueError, match="query blocks"):
        kernel.forward(qp, kp, out, table, kblocks, **{**kw, "q_block0": kw["q_block0"] + 1})
    with pytest.raises(ValueError, match="kp"):
        kernel.forward(qp, kp[:, :-kw["bs"]].contiguous(), out, table, kblocks, **kw)
    with pytest.raises(ValueError, match="qp"):
        kernel.backward(out, torch.zeros_like(qp[:, :-1]), None, table, kblocks, **kw)




def _op_case(seed=0):
    """A small float64 case of the op's arguments: 2 planes of 1 head, 4 blocks of 4 tokens, 8 buckets (clamped at
    distance 3: tiles of every kind), query blocks 1..3 against 3 key blocks each; qp and kp are leaves."""
    gen = torch.Generator().manual_seed(seed)
    bs, nb, hw, R = 4, 4, 1, 8
    table = relative_index_table(nb * bs, RelativePositionSpec(4, 0, 4))
    qp = torch.randn(2, nb * bs, R, generator=gen, dtype=torch.float64, requires_grad=True)
    kp = torch.randn(2, (nb + 2 * hw) * bs, R, generator=gen, dtype=torch.float64, requires_grad=True)
    kblocks = torch.randint(0, nb, (1, nb - 1, 3), generator=gen)
    return (qp, kp, table, kblocks, 1, nb - 1, 1, bs, hw)


def test_the_install_built_the_op_and_the_blocked_backend_runs_it_forward_and_backward(kernel):
    """CI's own `pip install -e ".[test]"` built the library into the package folder; the blocked backend runs its
    kernel forward and backward (eagerly with a gradient as one autograd node for every kind of row, `_KernelTerms`;
    the registered op serves traced graphs: the tests below) and equals the reference in float64."""
    assert cpu_kernels.library_path().parent == Path(cpu_kernels.__file__).resolve().parent
    config = tiny_config(max_position_embeddings=512, position_buckets=32)
    q, k, v, pos_key, pos_query, padding = make_inputs(config, 2, 131, seed=3)
    args = (layout_for(config, 0, 131), padding, 0.37, pos_key, pos_query, RelativePositionSpec.from_config(config))
    leaves = [q, k, v, pos_key, pos_query]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = disentangled_attention(q, k, v, *args, backend="blocked")
        grads = torch.autograd.grad(out.square().sum(), leaves)
    names = {event.name for event in profile.events()}
    assert {"_KernelTerms", "_KernelTermsBackward"} <= names
    ref = disentangled_attention(q, k, v, *args, backend="reference")
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    print("max error", (out - ref).abs().max().item(), max((a - b).abs().max().item()
                                                            for a, b in zip(grads, ref_grads)))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_the_dense_and_sparse_rows_share_one_gradient_per_product(kernel):
    """Eager training: the global rows' and the sparse rows' terms are one autograd node whose backward adds both
    kinds' gradients into one gradient of qp and one of kp, zeroed by the kernel's first call (two op calls filled a
    pair each, and autograd summed them; later torch filled the one pair before the kernel added into it), with the
    gradients the op's own formula gives, also when only one kind of row gets a gradient."""
    config = tiny_config(max_position_embeddings=512, position_buckets=32)
    q, k, v, pos_key, pos_query, padding = make_inputs(config, 2, 131, seed=5)
    args = (layout_for(config, 0, 131), padding, 0.37, pos_key, pos_query, RelativePositionSpec.from_config(config))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        out = disentangled_attention(q, k, v, *args, backend="blocked")
        torch.autograd.grad(out.square().sum(), [q, k, pos_key, pos_query])
    products = [event for event in profile.events() if event.name == "bigbird_ja::relative_terms"]
    assert not products  # eager: not the op
    B, H, N, D = q.shape
    bs = config.block_size
    Np = -(-N // bs) * bs
    R = 2 * args[-1].span
    gradient_shapes = ([B * H, Np, R], [B * H, Np + config.num_window_blocks // 2 * 2 * bs, R])
    touched = [(event.name, event.input_shapes[0]) for event in profile.events()
               if event.name in ("aten::zero_", "aten::fill_", "aten::add", "aten::add_") and event.input_shapes
               and event.input_shapes[0] in gradient_shapes]
    assert not touched  # neither filled by torch nor summed by autograd: the kernel zeroes and adds

    # the node's gradients against the op's, each kind of row alone and both
    from bigbird_ja.attention.blocked_terms import _KernelTerms
    from bigbird_ja.attention.relative import relative_index_table

    gen = torch.Generator().manual_seed(11)
    nb, g, hw, R = 6, 2, 1, 16
    P = 3
    table = relative_index_table(nb * bs, RelativePositionSpec(8, 8, 64))
    qp = torch.randn(P, nb * bs, R, generator=gen, dtype=torch.float64, requires_grad=True)
    kp = torch.randn(P, (nb + 2 * hw) * bs, R, generator=gen, dtype=torch.float64, requires_grad=True)
    dense_blocks = torch.arange(nb).view(1, 1, -1)
    sparse_blocks = torch.randint(0, nb, (P, nb - g, 3), generator=gen)
    segments = ((dense_blocks, g, 0), (sparse_blocks, nb - g, g))
    dense, sparse = _KernelTerms.apply(qp, kp, table, segments, P, bs, hw)
    op = cpu_kernels.relative_terms()
    for kind in ("dense", "sparse", "both"):
        weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) if kind in (name, "both") else None
                   for name, t in (("dense", dense), ("sparse", sparse))]
        loss = sum((t * w).sum() for t, w in zip((dense, sparse), weights) if w is not None)
        got = torch.autograd.grad(loss, [qp, kp], retain_graph=True)
        expected_loss = sum((op(qp, kp, table, blocks, P, nq, q0, bs, hw) * w).sum()
                            for (blocks, nq, q0), w in zip(segments, weights) if w is not None)
        expected = torch.autograd.grad(expected_loss, [qp, kp])
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    # autograd still runs the node when no output's gradient is defined (a later node gave None): no gradient back,
    # none computed (before: two zero-filled gradient buffers)
    class NoGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            return None

    loss = NoGradient.apply(dense).sum() + NoGradient.apply(sparse).sum() + (qp * 0).sum() + (kp * 0).sum()
    called = []
    hook = dense.grad_fn.register_hook(lambda grad_inputs, grad_outputs: called.append(grad_inputs))
    torch.autograd.grad(loss, [qp, kp])
    hook.remove()
    assert len(called) == 1 and all(grad is None for grad in called[0])


def test_op_passes_gradcheck_and_torch_opcheck(kernel):
    """The autograd formula (the backward op) against finite differences, and torch's own checks of a custom op:
    schema, fake implementation, autograd registration, traced by AOT autograd with dynamic shapes."""
    op = cpu_kernels.relative_terms()
    args = _op_case()
    assert torch.autograd.gradcheck(lambda qp, kp: op(qp, kp, *args[2:]), args[:2])
    assert torch.autograd.gradcheck(lambda qp: op(qp, None, *args[2:]), args[:1])
    torch.library.opcheck(op, args)


def test_op_traces_as_one_op_in_torch_export(kernel):
    class Terms(torch.nn.Module):
        def forward(self, qp, kp, table, kblocks):
            return torch.ops.bigbird_ja.relative_terms(qp, kp, table, kblocks, 1, kblocks.shape[1], 1, 4, 1)

    qp, kp, table, kblocks = [t.detach() for t in _op_case()[:4]]
    program = torch.export.export(Terms(), (qp, kp, table, kblocks))
    calls = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert calls == [torch.ops.bigbird_ja.relative_terms.default]
    torch.testing.assert_close(program.module()(qp, kp, table, kblocks), Terms()(qp, kp, table, kblocks))


def test_switched_off_the_blocked_backend_takes_the_pytorch_reads(monkeypatch):
    monkeypatch.setenv("BIGBIRD_JA_CPU_KERNELS", "0")
    assert cpu_kernels.relative_terms() is None
    config = tiny_config(max_position_embeddings=512, position_buckets=32)
    q, k, v, pos_key, pos_query, padding = make_inputs(config, 2, 131, seed=3)
    args = (layout_for(config, 0, 131), padding, 0.37, pos_key, pos_query, RelativePositionSpec.from_config(config))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = disentangled_attention(q, k, v, *args, backend="blocked")
    assert not [event.name for event in profile.events() if "bigbird_ja::" in event.name]
    torch.testing.assert_close(out, disentangled_attention(q, k, v, *args, backend="reference"), rtol=0, atol=1e-10)


ABSENT_RUN = """
import importlib.machinery, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
importlib.machinery.EXTENSION_SUFFIXES[:] = []  # what cpu_kernels looks for: as if the install built no library
import torch
import bigbird_ja
from bigbird_ja.attention import RelativePositionSpec, cpu_kernels, disentangled_attention, layout_for
sys.path.insert(0, sys.argv[1])
from conftest import tiny_config
from test_attention_backends import make_inputs
assert cpu_kernels.relative_terms() is None
config = tiny_config(max_position_embeddings=512, position_buckets=32)
q, k, v, pos_key, pos_query, padding = make_inputs(config, 2, 131, seed=3)
args = (layout_for(config, 0, 131), padding, 0.37, pos_key, pos_query, RelativePositionSpec.from_config(config))
out = disentangled_attention(q, k, v, *args, backend="blocked")
print((out - disentangled_attention(q, k, v, *args, backend="reference")).abs().max().item())
"""


def test_without_the_library_the_import_says_so_once_and_the_pytorch_reads_give_the_same_result(tmp_path):
    """A fresh process where the install built nothing: one warning at import naming the fix, no op registered, the
    blocked backend equals the reference, and nothing is compiled or written under the home folder."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "BIGBIRD_JA_CACHE")}
    run = subprocess.run([sys.executable, "-c", ABSENT_RUN, str(ROOT / "tests")], capture_output=True, text=True,
                         timeout=300, env=dict(env, HOME=str(home), CC="false"))
    assert run.returncode == 0, run.stderr[-3000:]
    said = [line for line in run.stderr.splitlines() if "relative terms" in line]
    assert len(said) == 1 and said[0].startswith("WARNING") and "C compiler" in said[0], run.stderr[-3000:]
    assert float(run.stdout.strip().splitlines()[-1]) <= 1e-10
    assert not list(home.rglob("*")), list(home.rglob("*"))


@pytest.mark.parametrize("case", ["compiler", "no compiler", "opt-out"])
def test_setup_builds_the_library_and_goes_on_without_a_compiler(tmp_path, case):
    """setup.py's build: the library in the package folder; with a compiler that fails (CC=false), or with
    BIGBIRD_JA_NO_NATIVE=1, the build still succeeds, without the library (the install takes the PyTorch reads)."""
    env = dict(os.environ, CC="false") if case == "no compiler" else dict(os.environ)
    if case == "opt-out":
        env["BIGBIRD_JA_NO_NATIVE"] = "1"
    else:
        env.pop("BIGBIRD_JA_NO_NATIVE", None)
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    built = list((tmp_path / "lib").rglob("_relative_terms*"))
    if case == "compiler":
        assert [p.relative_to(tmp_path / "lib").parent for p in built] == [Path("bigbird_ja/attention")]
        assert cpu_kernels.RelativeTermsKernel(built[0]).path == built[0]  # loads, with every entry point
    else:
        assert not built
        if case == "no compiler":
            assert "failed" in run.stderr + run.stdout


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_library_file_is_reported_not_run(tmp_path, monkeypatch, kernel, damage):
    """Issue 25, case 2: a library file damaged after the install (an empty or cut-off copy) is refused by the loader
    with a message naming the fix; the process goes on with the PyTorch reads instead of dying with a signal."""
    good = kernel.path.read_bytes()
    bad = tmp_path / kernel.path.name
    bad.write_bytes(b"" if damage == "empty" else good[: len(good) // 3])
    monkeypatch.setattr(cpu_kernels, "library_path", lambda: bad)
    loaded, why = cpu_kernels._load()
    assert loaded is None
    assert str(bad) in why and "reinstall" in why
    from bigbird_ja.attention import dropout  # the same library holds the dropout kernel: refused there too

    monkeypatch.setattr(dropout, "library_path", lambda: bad)
    native, why = dropout._load_native()
    assert native is None and "reinstall" in why


def _cpu_has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"),
                    reason="the kernels are built twice (AVX2 and baseline) on x86-64 ELF only")
def test_the_avx2_and_baseline_builds_of_the_kernels_give_the_same_bits(kernel, tmp_path):
    """csrc/shared.h builds each kernel entry point twice (AVX2 and baseline x86-64) and the loader runs the one the
    CPU has. Vectorising must not change a bit: the library built with the baseline copy alone (-DKERNEL_ENTRY=)
    gives what the installed one gives, for the relative terms forward and backward and for the hashed dropout, in
    every dtype."""
    from bigbird_ja.attention import dropout

    if _cpu_has_avx2():  # the installed library carries the AVX2 copy (where its symbols were kept)
        data = kernel.path.read_bytes()
        if b".symtab" in data:
            assert b"forward_task_f32.avx2" in data and b"rows_f32.avx2" in data
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, CFLAGS="-DKERNEL_ENTRY="))
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = (tmp_path / "lib").rglob("_relative_terms*")
    assert b"forward_task_f32.avx2" not in path.read_bytes()
    baseline = cpu_kernels.RelativeTermsKernel(path)
    for name in CASES:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            qp, kp, table, kblocks, kw = make_case(name, dtype, seed=3)
            nq, K, bs = kblocks.shape[1], kblocks.shape[2], kw["bs"]
            outs, grads = [], []
            for lib in (kernel, baseline):
                out = torch.empty(qp.shape[0], nq, bs, K * bs, dtype=dtype)
                lib.forward(qp, kp, out, table, kblocks, **kw)
                gqp, gkp = torch.zeros_like(qp), torch.zeros_like(kp)
                lib.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype), gqp, gkp,
                             table, kblocks, **kw)
                outs.append(out)
                grads.append((gqp, gkp))
            assert torch.equal(outs[0], outs[1]), (name, dtype)
            assert all(torch.equal(a, b) for a, b in zip(*grads)), (name, dtype)
    native_baseline = dropout._Native(path)
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        probs = torch.rand(2, 3, 4, 37, 83, generator=gen).to(dtype)  # odd rows and keys: the vector loops' tails
        query_pos = torch.randperm(4 * 37, generator=gen).view(4, 37)
        key_pos = torch.randint(0, 4096, (3, 4, 83), generator=gen)
        for view in (probs, probs.transpose(3, 4).contiguous().transpose(3, 4)):  # contiguous and strided keys
            got = [lib(view, query_pos, key_pos, 0.1, 1234567) for lib in (dropout.NATIVE, native_baseline)]
            assert torch.equal(got[0], got[1]), dtype
