"""benchmarks/bench_cpu.py: model modes (eval / train with default dropout), ModernBERT, depths, resuming a cut run.

The measuring child runs for real once (ModernBERT, 1 layer, 512 tokens); the parent's bookkeeping (what to run,
what to skip, what a resumed run adds) runs against a stand-in child that prints what a real one would."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import load_benchmark

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_cpu")


class FakeChild:
    """Stands in for subprocess.run of a child: reports every requested run, or fails the cases in `fail`."""

    def __init__(self, bench, fail=()):
        self.bench, self.fail, self.calls = bench, set(fail), []

    def __call__(self, command, env, timeout):
        case = command[command.index("--case") + 1]
        runs = command[command.index("--runs") + 1:command.index("--repeats")]
        layers = int(command[command.index("--layers") + 1])
        self.calls.append((case, layers, tuple(runs)))
        if case in self.fail:
            return subprocess.CompletedProcess(command, 1, "", "RuntimeError: boom")
        lines = []
        for run in runs:
            model_mode, mode = run.split("/")
            time_s = 1.0 + 0.5 * (mode == "train") + 0.25 * (model_mode == "train") + 0.125 * layers
            lines.append(self.bench.RESULT_MARKER + json.dumps(
                {"mode": mode, "model_mode": model_mode, "status": "ok", "time_s": time_s, "times_s": [time_s],
                 "peak_mib": 100.0, "dropout": {"hidden": 0.1} if model_mode == "train" else None}))
        return subprocess.CompletedProcess(command, 0, "\n".join(lines) + "\n", "")


def test_layers_take_a_count_or_base_and_model_mode_both_means_eval_then_train(bench):
    args = bench.parse_args(["--layers", "base"])
    assert args.layers is None and args.model_modes == ["eval", "train"]
    assert [bench.case_layers(c, args.layers) for c in bench.CASES] == [12, 12, 12, 22]
    args = bench.parse_args(["--layers", "3", "--model-mode", "train"])
    assert [bench.case_layers(c, args.layers) for c in bench.CASES] == [3, 3, 3, 3]
    assert args.model_modes == ["train"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--layers", "0"])


def test_resume_runs_only_what_is_missing_or_failed_and_joins_base_depth_rows(bench, tmp_path, monkeypatch):
    out = tmp_path / "cpu.json"
    monkeypatch.setattr(bench, "plot", lambda *a, **k: None)
    common = ["--lengths", "1024", "--out", str(out), "--memory-budget-gib", "0.5"]

    child = FakeChild(bench, fail={"modernbert"})
    monkeypatch.setattr(bench, "run_child", child)
    assert bench.main(common) == 0
    first = json.loads(out.read_text())["measurements"]
    # 4 cases x 2 model modes x 2 passes; DeBERTa's dense fwd+bwd at 2 layers is over the 0.5 GiB budget
    assert len(first) == 16
    status = {(r["case"], r["model_mode"], r["mode"]): r["status"] for r in first}
    assert status[("hf-deberta-v2", "train", "train")] == status[("hf-deberta-v2", "eval", "train")] == "skipped"
    assert {s for (case, *_), s in status.items() if case == "modernbert"} == {"failed"}
    assert ("hf-deberta-v2", 2, ("eval/forward", "train/forward")) in child.calls

    child = FakeChild(bench)
    monkeypatch.setattr(bench, "run_child", child)
    assert bench.main(common + ["--resume"]) == 0
    assert child.calls == [("modernbert", 2, ("eval/forward", "eval/train", "train/forward", "train/train"))]
    payload = json.loads(out.read_text())
    assert len(payload["measurements"]) == 16 and len(payload["environment"]["runs"]) == 2
    assert not [r for r in payload["measurements"] if r["status"] == "failed"]

    child = FakeChild(bench)
    monkeypatch.setattr(bench, "run_child", child)
    assert bench.main(common + ["--resume", "--layers", "base", "--modes", "forward", "--model-mode", "train",
                                "--memory-budget-gib", "12"]) == 0
    assert sorted(child.calls) == [(case, layers, ("train/forward",)) for case, layers in
                                   [("bigbird-ja", 12), ("hf-bigbird", 12), ("hf-deberta-v2", 12), ("modernbert", 22)]]
    table = out.with_suffix(".md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1,024")]
    assert len(rows) == 5 and rows[-1].startswith("| 1,024 | 12 (ModernBERT 22) | train, default dropout | forward |")
    # bigbird-ja 1.25 + 0.125 * 12 = 2.75 s, ModernBERT 1.25 + 0.125 * 22 = 4.0 s at base depth
    assert rows[-1].endswith("| 0.69x |")

    child = FakeChild(bench)  # a larger budget: the skipped rows are estimated again, and now run
    monkeypatch.setattr(bench, "run_child", child)
    assert bench.main(common + ["--resume", "--cases", "hf-deberta-v2", "--memory-budget-gib", "2"]) == 0
    assert child.calls == [("hf-deberta-v2", 2, ("eval/train", "train/train"))]
    assert {r["status"] for r in json.loads(out.read_text())["measurements"]} == {"ok"}

    with pytest.raises(SystemExit, match="dtype"):
        bench.main(common + ["--resume", "--dtype", "bfloat16"])
    with pytest.raises(SystemExit, match="--layers 3"):
        bench.main(common + ["--resume", "--layers", "3"])


def test_files_from_before_model_modes_read_as_eval_rows(bench, tmp_path):
    # The committed table of 2026-12-02, written before model modes and depths existed; kept as a
    # fixture because benchmarks/results is re-written by every re-run.
    before_modes = REPO / "tests" / "fixtures" / "cpu_attention_2026-12-02.json"
    shutil.copy(before_modes, tmp_path / "old.json")
    settings = {"dtype": "float32", "threads": 2, "malloc": {"choice": "default", "environment": {}},
                "cpu_kernel": "on", "batch": 1}
    records, runs = bench.load_for_resume(tmp_path / "old.json", settings)
    assert runs[0]["command"].startswith("python benchmarks/bench_cpu.py")
    assert {(r["model_mode"], r["depth"], r["layers"]) for r in records} == {("eval", "equal", 2)}
    table = bench.markdown_table(records, list(bench.CASES))
    old_row = "| 4,096 | forward | 0.844 s / 644 MiB | 1.515 s / 1,514 MiB | 9.296 s / 4,497 MiB | 0.56x | 11.01x |"
    assert old_row in (tmp_path / "old.json").read_text().replace("\\n", "\n")
    assert ("| 4,096 | 2 | eval | forward | 0.844 s / 644 MiB | 1.515 s / 1,514 MiB | 9.296 s / 4,497 MiB | "
            " | 0.56x | 11.01x | - |") in table


def test_transformers_bigbird_block_sparse_reports_no_attention_dropout(bench):
    from transformers import BigBirdConfig, BigBirdModel

    config = BigBirdConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                           intermediate_size=32, max_position_embeddings=1024, attention_type="block_sparse",
                           block_size=16, num_random_blocks=1)
    settings = bench.dropout_settings("hf-bigbird", BigBirdModel(config, add_pooling_layer=False))
    assert settings == {"hidden": 0.1, "attention": 0.0, "attention_config_unused": 0.1}


def test_a_real_child_measures_modernbert_in_eval_and_train_mode(bench, tmp_path):
    out = tmp_path / "cpu.json"
    assert bench.main(["--cases", "modernbert", "--lengths", "512", "--layers", "1", "--modes", "forward",
                       "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["measurements"]
    print([(r["model_mode"], r["status"], r.get("message"), r.get("time_s")) for r in records])
    assert [(r["model_mode"], r["status"], r["layers"]) for r in records] == [("eval", "ok", 1), ("train", "ok", 1)]
    assert all(r["attn_implementation"] == "sdpa" and r["time_s"] > 0 for r in records)
    assert records[0]["dropout"] is None
    assert records[1]["dropout"] == {"embedding": 0.0, "attention": 0.0, "mlp": 0.0}  # ModernBERT's defaults
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| 512 | 1 | train, default dropout | forward |" in out.with_suffix(".md").read_text()
