"""`bigbird-ja plan` (bigbird_ja/training/planner.py): the memory formulas by hand, DeepSpeed's own estimators, the
activation count against real tensors, bad input, every attention type, the written preset and the preset headers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from bigbird_ja.configuration import build_model_config
from bigbird_ja.training import planner
from conftest import cli_command, subprocess_env

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/model/tiny-cpu.yaml"
GIB = 2 ** 30


def test_model_states_by_hand_for_every_stage_and_precision():
    # P = 1000 parameters, largest layer 100, n = 4 ranks
    bf16 = {s: planner.model_state_bytes(1000, 100, s, 4, "bf16") for s in range(4)}
    assert bf16[0] == {"parameters": 2000, "gradients": 6000, "optimizer": 3000}  # 12 x 1000 / 4
    assert bf16[1] == {"parameters": 2000, "gradients": 2000 + 1000, "optimizer": 3000}
    assert bf16[2] == {"parameters": 2000, "gradients": 1500, "optimizer": 3000}  # 2 + 18/n = 6500 in all
    assert bf16[3] == {"parameters": 500 + 400, "gradients": 1000, "optimizer": 3000}  # 18/n + 4 x largest
    fp32 = {s: planner.model_state_bytes(1000, 100, s, 4, "fp32") for s in range(4)}
    assert fp32[0] == {"parameters": 4000, "gradients": 4000, "optimizer": 8000}  # no master copy
    assert fp32[1] == {"parameters": 4000, "gradients": 5000, "optimizer": 3000}
    assert fp32[2] == {"parameters": 4000, "gradients": 1000, "optimizer": 3000}
    assert fp32[3] == {"parameters": 1000 + 400, "gradients": 1000, "optimizer": 2000}


def _tiny_facts(seq=256, precision="fp32", **overrides):
    config = build_model_config(TINY, overrides)
    return config, planner.model_facts(config, seq, precision)


@pytest.mark.parametrize("gpus_per_node,nodes", [(1, 1), (8, 1), (8, 4), (4, 30)])
def test_model_states_equal_deepspeeds_estimators(gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from bigbird_ja.modeling import BigBirdJaForMaskedLM

    config, facts = _tiny_facts(precision="bf16")
    total, largest = model_to_params(BigBirdJaForMaskedLM(config))
    assert (facts.num_params, facts.largest_layer_params) == (total, largest)  # the meta count is DeepSpeed's
    world = gpus_per_node * nodes
    _, zero2 = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes, cpu_offload=False,
                                                        cpu_offload_params=False)
    ours2 = sum(planner.model_state_bytes(total, largest, 2, world, "bf16").values())
    ours3 = sum(planner.model_state_bytes(total, largest, 3, world, "bf16").values())
    print(f"ZeRO-2: ours {ours2:,.0f} DeepSpeed {zero2:,}; ZeRO-3: ours {ours3:,.0f} DeepSpeed {zero3:,}")
    assert int(ours2) == zero2 and int(ours3) == zero3


@pytest.mark.parametrize("attention_type", ["block_sparse", "full"])
def test_activation_count_on_meta_equals_the_bytes_real_tensors_save(attention_type):
    from bigbird_ja.modeling import BigBirdJaForMaskedLM

    config, facts = _tiny_facts(seq=256, attention_type=attention_type)
    torch.manual_seed(0)
    model = BigBirdJaForMaskedLM(config).train()
    real = planner._saved_bytes(model, torch.randint(5, 100, (3, 256)))
    predicted = facts.act_per_call + 3 * facts.act_per_sequence
    print(f"{attention_type}: real {real:,} predicted {predicted:,.0f}")
    assert abs(predicted / real - 1) < 0.01  # linear in the micro-batch (fitted at 1 and 2, checked at 3)


def test_checkpointing_keeps_less_and_full_attention_more_than_sparse():
    _, sparse = _tiny_facts(seq=1024)
    _, full = _tiny_facts(seq=1024, attention_type="full")
    assert planner.activation_bytes(sparse, 2, True) < planner.activation_bytes(sparse, 2, False)
    assert full.act_per_sequence > 1.5 * sparse.act_per_sequence  # N^2 scores against ~N x 7 blocks


def test_an_unknown_gpu_without_overrides_is_an_error_naming_the_flags():
    with pytest.raises(ValueError, match="not a known GPU kind.*--memory-gib.*missing"):
        planner.resolve_gpu("mi300x")
    gpu = planner.resolve_gpu("mi300x", 192, 1307, 300, 400)
    assert gpu.peak_tflops("bf16") == 1307 and gpu.memory_gib == 192


def test_a_micro_batch_that_never_fits_and_a_model_that_never_fits_are_errors():
    gpu = planner.resolve_gpu("a100-40gb")
    with pytest.raises(ValueError, match=r"--micro-batch 100000 never fits.*largest that fits is \d+"):
        planner.plan_run(TINY, 1024, gpu, 1, 8, 1e9, micro_batch=100000)
    small = planner.resolve_gpu("toy", memory_gib=1.0, peak_tflops=10, intra_node_gbps=10, inter_node_gbps=1)
    with pytest.raises(ValueError, match="no setting fits.*more GPUs"):
        planner.plan_run("configs/model/base-4096.yaml", 4096, small, 1, 1, 1e9)


def test_the_plan_of_the_base_model_recommends_a_fitting_setting():
    gpu = planner.resolve_gpu("a100-40gb")
    plan = planner.plan_run("configs/model/base-4096.yaml", 4096, gpu, 120, 8, 48e9)
    best = plan.recommended
    assert best.fits and best.memory["total"] <= 40 * GIB and len(plan.rows) == 8
    assert best.tokens_per_s >= 0.99 * max(r.tokens_per_s for r in plan.rows if r.fits)
    assert 0 < best.mfu <= 1 and 0 < best.scaling <= 1.0 + 1e-9
    text = planner.format_plan(plan)
    assert "recommended: ZeRO-" in text and "GPU-hours" in text


def test_a_warm_started_deberta_at_512_tokens_with_full_attention_plans():
    gpu = planner.resolve_gpu("h100")
    overrides = {"attention_type": "full", "max_position_embeddings": 512, "position_buckets": 256,
                 "max_relative_positions": 512, "vocab_size": 128100}
    plan = planner.plan_run("configs/model/base-4096.yaml", 512, gpu, 2, 8, 1e9, model_overrides=overrides)
    assert plan.recommended.fits and plan.num_params > 180e6  # DeBERTa-v3-base's 128k vocabulary


def test_update_header_rewrites_only_the_generated_comment_block(tmp_path):
    src = REPO / "configs" / "pretrain" / "base-4096-1node.yaml"
    path = tmp_path / src.name
    text = src.read_text()
    if planner.PLAN_ARGS_PREFIX not in text:
        text = f"{planner.PLAN_ARGS_PREFIX} --gpu a100-80gb --nodes 1 --gpus-per-node 8\n" + text
    path.write_text(text)
    body = [line for line in src.read_text().split("\n") if not line.startswith("#")]
    calls = []

    def fake(args, cfg):
        calls.append(args)
        plan = planner.plan_run(TINY, 256, planner.resolve_gpu("h100"), 1, 8, 1e9)
        return plan, plan.recommended, "bigbird-ja plan ..."

    planner.update_header(path, fake)
    first = path.read_text()
    assert calls and calls[0][:2] == ["--gpu", calls[0][1]]
    assert first.count(planner.HEADER_BEGIN) == 1
    assert [line for line in first.split("\n") if not line.startswith("#")] == body
    assert not planner.update_header(path, fake)  # idempotent: the second run changes nothing


@pytest.mark.slow
def test_the_written_preset_passes_pretrain_dry_run(tmp_path):
    gpu = planner.resolve_gpu("cpu", memory_gib=8, peak_tflops=0.1, intra_node_gbps=10, inter_node_gbps=1)
    plan = planner.plan_run(TINY, 256, gpu, 1, 1, 1e6, global_batch=8, precision="fp32",
                            model_overrides={"max_position_embeddings": 256})
    preset = planner.write_preset(plan, REPO / "configs" / "pretrain" / "tiny-cpu.yaml", tmp_path / "planned.yaml")
    text = preset.read_text()
    assert planner.PLAN_ARGS_PREFIX in text and planner.HEADER_BEGIN in text
    cmd = cli_command(1, ["pretrain", "--config", str(preset), "--dry-run", f"--run.output_dir={tmp_path / 'run'}",
                          f"--data.dir={tmp_path / 'data'}", f"--data.tokenizer={tmp_path / 'tok'}"])
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    b = plan.recommended
    assert f'"train_micro_batch_size_per_gpu": {b.micro_batch}' in proc.stdout
    assert f'"stage": {b.stage}' in proc.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
