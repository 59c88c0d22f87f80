"""The C kernel of the relative terms (bigbird_ja/attention/csrc/relative_terms.c) against its definition, written
out with plain indexing, on random tables and block lists; its build cache and its fallbacks. (The blocked backend
with and without it is compared with the dense reference in test_attention_backends.py.)"""

import logging
import os
import struct
import subprocess
import sys

import pytest
import torch

from bigbird_ja.attention import RelativePositionSpec, cpu_kernels, disentangled_attention, layout_for
from bigbird_ja.attention.relative import relative_index_table
from conftest import tiny_config
from test_attention_backends import make_inputs


@pytest.fixture(scope="module")
def kernel():
    k = cpu_kernels.relative_terms()
    if k is None:
        pytest.skip("the CPU kernel cannot be built here (no C compiler)")
    return k


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


def test_build_is_cached_and_written_whole(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGBIRD_JA_CACHE", str(tmp_path))
    path = cpu_kernels.build()
    assert path.parent == tmp_path / "cpu_kernels" and path.exists()
    stamp = path.stat().st_mtime_ns
    assert cpu_kernels.build() == path and path.stat().st_mtime_ns == stamp  # found, not rebuilt
    # the library and the record of its checksum; no temporary file left behind
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".json"]


def test_without_the_kernel_the_blocked_backend_takes_the_pytorch_reads(monkeypatch, tmp_path, caplog):
    """Disabled, or unbuildable (a compiler that fails): relative_terms() is None, a failed build is logged once, and
    the op still equals the reference."""
    monkeypatch.setenv("BIGBIRD_JA_CPU_KERNELS", "0")
    assert cpu_kernels.relative_terms() is None
    monkeypatch.delenv("BIGBIRD_JA_CPU_KERNELS")
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("BIGBIRD_JA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1 on anything
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.relative_terms() is None
        assert cpu_kernels.relative_terms() is None
    assert len([r for r in caplog.records if "not available" in r.getMessage()]) == 1

    config = tiny_config(max_position_embeddings=512, position_buckets=32)
    q, k, v, pos_key, pos_query, padding = make_inputs(config, 2, 131, seed=3)
    args = (layout_for(config, 0, 131), padding, 0.37, pos_key, pos_query, RelativePositionSpec.from_config(config))
    torch.testing.assert_close(disentangled_attention(q, k, v, *args, backend="blocked"),
                               disentangled_attention(q, k, v, *args, backend="reference"), rtol=0, atol=1e-10)


def test_kernel_takes_only_what_it_supports():
    assert cpu_kernels.supports(torch.empty(1, dtype=torch.float32))
    assert cpu_kernels.supports(torch.empty(1, dtype=torch.float64))
    assert cpu_kernels.supports(torch.empty(1, dtype=torch.bfloat16))
    assert not cpu_kernels.supports(torch.empty(1, dtype=torch.float16))
    assert not cpu_kernels.supports(torch.empty(1, device="meta"))


def test_a_model_folders_flat_copy_without_the_c_source_takes_the_pytorch_reads(monkeypatch, tmp_path, caplog):
    """hub.py copies this module flat into saved folders, without csrc/: no build is tried and nothing is logged."""
    monkeypatch.setattr(cpu_kernels, "SOURCE", tmp_path / "csrc" / "relative_terms.c")
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    with caplog.at_level(logging.DEBUG, logger=cpu_kernels.__name__):
        assert cpu_kernels.relative_terms() is None
    assert not caplog.records and not cpu_kernels._loaded


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


# The cache: a damaged library must never reach ctypes (a cut-short one is a Bus error, bytes changed inside an
# intact ELF header an Illegal instruction, both killing the process on every later run). Each damage is met in a
# fresh process, so a signal shows as a negative return code instead of killing pytest.

KERNEL_RUN = """
import sys, torch
from bigbird_ja.attention import cpu_kernels
kernel = cpu_kernels.relative_terms()
if kernel is None:
    sys.exit("the kernel did not load")
case = torch.load(sys.argv[1])
out = torch.empty(case["shape"], dtype=torch.float64)
kernel.forward(case["qp"], case["kp"], out, case["table"], case["kblocks"], **case["kw"])
torch.save(out, sys.argv[2])
"""


def damage_by_cutting_short(data: bytes) -> bytes:
    return data[:len(data) // 2]


def damage_inside(data: bytes) -> bytes:
    """Every byte of the code (.text) inverted; the ELF header and tables intact, so the loader maps it."""
    start, size = text_section(data)
    return data[:start] + bytes(b ^ 0xFF for b in data[start:start + size]) + data[start + size:]


def text_section(data: bytes) -> tuple[int, int]:
    """(file offset, size) of .text in a 64-bit little-endian ELF file (what the test machines build)."""
    if data[:6] != b"\x7fELF\x02\x01":
        pytest.skip("the kernel library is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entsize) for i in range(count)]
    name_table = headers[names][4]
    for name, _, _, _, offset, size in headers:
        if data[name_table + name:].startswith(b".text\0"):
            return offset, size
    raise AssertionError("no .text section")


@pytest.mark.slow  # a fresh interpreter that imports torch: 5-10 s on 2 busy cores
@pytest.mark.parametrize("damage", [damage_by_cutting_short, damage_inside])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(kernel, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("BIGBIRD_JA_CACHE", str(tmp_path / "cache"))
    path = cpu_kernels.build()
    intact = path.read_bytes()
    path.write_bytes(damage(intact))
    qp, kp, table, kblocks, kw = make_case("clamped buckets, sparse rows", torch.float64, seed=11)
    shape = (qp.shape[0], kblocks.shape[1], kw["bs"], kblocks.shape[2] * kw["bs"])
    torch.save(dict(qp=qp, kp=kp, table=table, kblocks=kblocks, kw=kw, shape=shape), tmp_path / "case.pt")

    run = subprocess.run([sys.executable, "-c", KERNEL_RUN, str(tmp_path / "case.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, BIGBIRD_JA_CACHE=str(tmp_path / "cache")))
    print(run.stderr[-3000:])
    assert run.returncode == 0, f"exit {run.returncode} (negative: killed by signal {-run.returncode})"
    expected = terms_by_definition(qp, kp, table, kblocks, nq=kblocks.shape[1], **kw)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)
    warnings = [line for line in run.stderr.splitlines() if str(path) in line]
    assert len(warnings) == 1 and "rebuil" in warnings[0], run.stderr
    assert path.read_bytes() == intact  # repaired: the next run loads it without a word
    assert cpu_kernels.build() == path and path.read_bytes() == intact


def test_a_process_that_built_the_library_survives_its_cached_file_being_rewritten_in_place(tmp_path):
    """The build's load check maps a copy, not the file renamed into the cache: a cached library truncated in place
    (`cp` over it, a damaged disk) must not kill the process that built it (it died with SIGBUS at exit)."""
    script = ("from bigbird_ja.attention import cpu_kernels\n"
              "path = cpu_kernels.build()\n"
              "data = path.read_bytes()\n"
              "path.write_bytes(data[: len(data) // 2])\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, BIGBIRD_JA_CACHE=str(tmp_path / "cache")))
    assert run.returncode == 0, f"exit {run.returncode} (negative: killed by signal {-run.returncode}): {run.stderr}"
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix == ".so"
                and p.name.startswith("tmp")], "the load check's copy was left behind"


def test_a_compiler_that_writes_nothing_caches_nothing(tmp_path, monkeypatch, caplog):
    """A compiler that exits 0 without output (full disk, a wrapper script) leaves nothing in the cache: the run
    takes the PyTorch reads with one warning, and a later run whose compiler works builds the kernel."""
    works = tmp_path / "compiler-works"
    fake = tmp_path / "cc"  # the same --version either way, so the same cache key
    fake.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "flaky cc 1.0"; exit 0; fi\n'
                    f'if [ -e {works} ]; then exec cc "$@"; fi\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("BIGBIRD_JA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.relative_terms() is None
        assert cpu_kernels.relative_terms() is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "wrote" in warnings[0], warnings
    cached = tmp_path / "cache" / "cpu_kernels"
    assert not cached.exists() or not list(cached.iterdir())

    config = tiny_config(max_position_embeddings=512, position_buckets=32)
    q, k, v, pos_key, pos_query, padding = make_inputs(config, 1, 75, seed=5)
    args = (layout_for(config, 0, 75), padding, 0.37, pos_key, pos_query, RelativePositionSpec.from_config(config))
    torch.testing.assert_close(disentangled_attention(q, k, v, *args, backend="blocked"),
                               disentangled_attention(q, k, v, *args, backend="reference"), rtol=0, atol=1e-10)

    works.touch()  # a later process, its compiler mended
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        built = cpu_kernels.relative_terms()
    assert built is not None and not caplog.records
    qp, kp, table, kblocks, kw = make_case("random table", torch.float64, seed=4)
    out = torch.empty(qp.shape[0], kblocks.shape[1], kw["bs"], kblocks.shape[2] * kw["bs"], dtype=torch.float64)
    built.forward(qp, kp, out, table, kblocks, **kw)
    torch.testing.assert_close(out, terms_by_definition(qp, kp, table, kblocks, nq=kblocks.shape[1], **kw),
                               rtol=0, atol=0)
