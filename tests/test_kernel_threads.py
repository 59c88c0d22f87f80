"""The native kernels' threads (csrc/threads.c): torch's own OpenMP team where torch runs on OpenMP, pthreads of their
own otherwise, the same bits either way and on a team smaller than asked for."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from bigbird_ja.attention import cpu_kernels
from bigbird_ja.attention import dropout as D
from test_cpu_kernels import ROOT, kernel, make_case  # noqa: F401  (kernel: the fixture)

TORCH_ON_OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def library(kernel):
    return ctypes.CDLL(str(kernel.path))  # the loaded library's handle: the same state the ops use


def run_both_kernels(kernel):
    """The relative terms (forward and backward) and the hashed dropout on inputs big enough for several shares."""
    qp, kp, table, kblocks, kw = make_case("clamped buckets, sparse rows", torch.float64)
    out = torch.empty(qp.shape[0], kblocks.shape[1], kw["bs"], kblocks.shape[2] * kw["bs"], dtype=torch.float64)
    kernel.forward(qp, kp, out, table, kblocks, **kw)
    gqp, gkp = torch.empty_like(qp), torch.empty_like(kp)
    kernel.backward(out, gqp, gkp, table, kblocks, **kw, zero=True)
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 12, 8, 64, 128, generator=gen)
    key_pos = torch.randint(0, 512, (12, 8, 128), generator=gen)
    dropped = D.NATIVE(probs, torch.arange(8 * 64).view(8, 64), key_pos, 0.1, 3)
    return out, gqp, gkp, dropped


@pytest.fixture
def pthreads_after(kernel):
    """Whatever the test sets, the library goes back to what the import chose."""
    yield library(kernel)
    assert cpu_kernels.use_torch_threads(library(kernel)) == kernel.uses_torch_threads


@pytest.mark.skipif(not TORCH_ON_OPENMP, reason="torch here does not run on OpenMP")
def test_the_kernels_run_on_torchs_openmp_team(kernel):
    """Threads of their own would share the cores with torch's spinning workers (a call right after a matmul took
    2.4x its idle time on 2 cores): the import hands the library torch's OpenMP entry points."""
    assert kernel.uses_torch_threads
    assert library(kernel).bbja_uses_openmp() == 1
    assert D.NATIVE is not None


def test_openmp_and_pthreads_give_the_same_bits_on_any_number_of_threads(kernel, pthreads_after):
    lib = pthreads_after
    threads = torch.get_num_threads()
    results = []
    try:
        for openmp in ([False, True] if TORCH_ON_OPENMP else [False]):
            if openmp:
                assert cpu_kernels.use_torch_threads(lib)
            else:
                assert lib.bbja_use_openmp(None, None, None) == 0
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(run_both_kernels(kernel))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("team", [1, 2])
def test_a_team_smaller_than_asked_for_still_runs_every_share(kernel, pthreads_after, team):
    """Inside another parallel region OpenMP gives a team of one; each member then takes every team-th share. A
    stand-in for GOMP_parallel runs the members one after another with `team` members for a call that asks for 3."""
    lib = pthreads_after
    body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    member = [0]
    asked = []

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    def parallel(body, data, num_threads, flags):
        asked.append(num_threads)
        for m in range(team):
            member[0] = m
            body_type(body)(data)

    thread_num = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: member[0])
    num_threads = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: team)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        lib.bbja_use_openmp(None, None, None)
        expected = run_both_kernels(kernel)
        assert lib.bbja_use_openmp(ctypes.cast(parallel, ctypes.c_void_p), ctypes.cast(thread_num, ctypes.c_void_p),
                                   ctypes.cast(num_threads, ctypes.c_void_p)) == 1
        got = run_both_kernels(kernel)
    finally:
        torch.set_num_threads(threads)
    assert asked and set(asked) == {3}
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_pthreads_can_be_chosen(kernel):
    code = ("from bigbird_ja.attention import cpu_kernels, dropout\n"
            "import ctypes\n"
            "lib = ctypes.CDLL(str(cpu_kernels.KERNEL.path))\n"
            "print(cpu_kernels.KERNEL.uses_torch_threads, lib.bbja_uses_openmp())")
    env = dict(os.environ, BIGBIRD_JA_CPU_THREADS="pthreads")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    assert out == ["False", "0"]


@pytest.mark.skipif(not TORCH_ON_OPENMP, reason="the benchmark compares with torch's OpenMP team")
def test_the_threads_benchmark_measures_both_settings_and_restores_the_imports_choice(kernel):
    from conftest import load_benchmark

    bench = load_benchmark("bench_kernel_threads")
    result = bench.measure(256, repeats=1)
    assert set(result) == {f"{s} {c} ms" for s in bench.SETTINGS for c in bench.COLUMNS}
    assert all(value > 0 for value in result.values())
    assert library(kernel).bbja_uses_openmp() == 1  # as the import set it
