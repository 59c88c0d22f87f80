"""benchmarks/train_step_ab.py: sides interleaved with the order rotating, each compared with BigBird of its own round.

The measuring runs are stood in for (a real one is train_step_repeats.py, which tests/test_bench_cpu.py's real child
covers through bench_cpu): what is checked is the bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ab():
    return load_benchmark("train_step_ab")


def test_rounds_rotate_the_order_and_ratios_are_against_the_same_rounds_bigbird(ab, tmp_path, monkeypatch):
    calls = []
    # a machine that slows down round after round: BigBird and both sides alike
    speed = {"before": 1.2, "after": 0.9, ab.BIGBIRD: 1.0}

    def fake_run(side, path, length, steps, threads):
        round_ = sum(1 for c in calls if c[1] == length) // 3
        calls.append((side, length, path))
        median = speed[side] * length / 1024 * (1 + round_)
        return {"tag": side, "case": "x", "length": length, "median_s": median, "min_s": median}

    monkeypatch.setattr(ab, "run_side", fake_run)
    out = tmp_path / "ab.json"
    other = tmp_path / "other"
    (other / "bigbird_ja").mkdir(parents=True)
    assert ab.main(["--checkout", f"before={other}", "--checkout", "after=.", "--lengths", "1024", "2048",
                    "--rounds", "3", "--out", str(out)]) == 0
    firsts = [calls[i][0] for i in range(0, len(calls), 3)]
    assert firsts == ["before", "before", "after", "after", ab.BIGBIRD, ab.BIGBIRD]  # each goes first in turn
    assert {path for side, _, path in calls if side == "after"} == {REPO.resolve()}
    assert {path for side, _, path in calls if side == ab.BIGBIRD} == {None}
    data = json.loads(out.read_text())
    rows = {(row["length"], row["checkout"]): row for row in data["summary"]}
    # the slowing machine cancels out: every round's ratio is the sides' true one
    assert rows[1024, "after"]["ratios"] == [0.9, 0.9, 0.9] and rows[2048, "before"]["median_ratio"] == 1.2
    assert rows[1024, "after"]["median_step_s"] == pytest.approx(0.9 * 2)
    assert "**0.90x**" in out.with_suffix(".md").read_text()


def test_a_checkout_without_the_package_or_a_name_is_refused(ab, tmp_path):
    with pytest.raises(SystemExit):
        ab.main(["--checkout", f"x={tmp_path}"])
    with pytest.raises(SystemExit):
        ab.main(["--checkout", "."])


def test_the_dropout_cost_benchmark_switches_attention_dropout_and_nothing_else():
    """Its two models have the same weights and differ only where attention dropout acts: equal in eval mode,
    different in train mode with the same seed."""
    import torch

    from conftest import load_benchmark

    bench = load_benchmark("attention_dropout_cost")
    with_dropout, without = (bench.build(1024, rate) for rate in bench.RATES)
    assert with_dropout.config.attention_probs_dropout_prob == 0.1 and without.config.attention_probs_dropout_prob == 0
    import bench_cpu  # on the path once the benchmark is loaded

    inputs = bench_cpu.make_inputs(1024)
    with torch.no_grad():
        outs = []
        for model in (with_dropout, without):
            torch.manual_seed(3)
            outs.append(model(**inputs).last_hidden_state)
        assert not torch.equal(*outs)  # train mode: only the attention dropout differs
        for model in (with_dropout, without):
            model.eval()
        assert torch.equal(with_dropout(**inputs).last_hidden_state, without(**inputs).last_hidden_state)
