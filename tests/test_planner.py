"""`bigbird-ja plan` (bigbird_ja/training/planner/): the memory formulas by hand, DeepSpeed's own estimators, the
activation count against real tensors, bad input, every attention type, the written preset and the preset headers."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest
import torch

from bigbird_ja import BigBirdJaConfig
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


def test_live_bytes_counts_new_storages_until_freed_and_not_views_or_weights():
    weight = torch.ones(64, 32)  # made before: not counted
    with planner.LiveBytes() as live:
        a = torch.ones(100, 64) @ weight  # 100 x 64 ones (freed at once) and the 100 x 32 product
        view = a.t()  # a view: no new storage
        b = a.relu()  # + 100 x 32
        del a  # the view keeps a's storage
        after_del = live.now
        del view
        after_view = live.now
        weight.t()  # a view of a weight: nothing
    assert live.peak == (100 * 64 + 100 * 32) * 4  # the ones and the product, before the ones were freed
    assert after_del == 2 * 100 * 32 * 4 and after_view == 100 * 32 * 4 and live.now == 100 * 32 * 4
    del b


@pytest.mark.parametrize("with_grads", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attention_type", ["block_sparse", "full"])
def test_activation_peak_on_meta_equals_torchs_mem_tracker_on_a_real_cpu_step(attention_type, checkpointing,
                                                                            with_grads, monkeypatch):
    # torch's own tracker, independent of ours: live storages of a real forward + backward on CPU, at its peak
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from bigbird_ja.attention import blocked, dropout
    from bigbird_ja.modeling import BigBirdJaForMaskedLM

    # The planner counts the blocked backend's PyTorch ops (what a GPU without the Triton kernels runs, and what the
    # meta run traces); the CPU-only C kernel of the relative terms keeps less (no index tensors: 2.4% less activation
    # memory than predicted at this size, so the plan errs on the safe side), so it is off here.
    monkeypatch.setattr(blocked, "relative_terms_kernel", lambda: None)
    # Likewise the hidden dropout: on CPU it is the hash and keeps no mask (2.5% less here); a GPU's is F.dropout's
    # (a saved mask), which the meta run traces.
    monkeypatch.setattr(dropout, "native_supports", lambda x: False)

    config, facts = _tiny_facts(seq=256, attention_type=attention_type)
    torch.manual_seed(0)
    model = BigBirdJaForMaskedLM(config).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    ids = torch.randint(5, 100, (3, 256))
    drop = [] if with_grads else model.parameters()  # kept: ZeRO-0's .grad; dropped: held elsewhere
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in drop]
    tracker = MemTracker()
    tracker.track_external(model, ids)
    with tracker:
        model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    real = peak["Total"] - peak[_MemRefType.PARAM] - peak[_MemRefType.OTH]  # weights and the input ids
    # fitted at 1 and 2 sequences, checked at 3
    predicted = planner.activation_bytes(facts, 3, checkpointing, with_grads)
    print(f"{attention_type}, checkpointing {checkpointing}, gradients kept {with_grads}: MemTracker {real:,} "
          f"predicted {predicted:,.0f}")
    assert abs(predicted / real - 1) < 0.01


def test_the_planner_names_the_backend_it_counts_in_the_config_instead_of_patching_the_dispatcher():
    package = REPO / "bigbird_ja" / "training" / "planner"
    patching = [path.name for path in package.glob("*.py") if "unittest" in path.read_text(encoding="utf-8")]
    assert patching == []
    # "auto" is planned as a GPU run: the fused Triton kernels, which keep no score matrix (the blocked backend does;
    # with checkpointing both peak in the MLM head's backward)
    _, auto = _tiny_facts(precision="bf16", attention_backend="auto")
    _, triton = _tiny_facts(precision="bf16", attention_backend="triton")
    _, blocked = _tiny_facts(precision="bf16", attention_backend="blocked")
    per_sequence = {name: {key: peak.per_sequence for key, peak in facts.activations.items()}
                    for name, facts in (("auto", auto), ("triton", triton), ("blocked", blocked))}
    assert per_sequence["auto"] == per_sequence["triton"]
    assert all(per_sequence["triton"][False, grads] < per_sequence["blocked"][False, grads] for grads in (False, True))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_mlm_heads_backward_holds_three_fp32_logit_buffers(precision):
    # by hand: at the peak (the log-softmax backward) the log-softmax output saved for backward, the gradient coming
    # from the loss and the gradient it makes are alive, each N x V in fp32 (the loss is taken in fp32): 12 bytes
    # per logit per sequence, so 10,000 more vocabulary entries cost 12 x N x 10,000 bytes more per sequence
    seq = 256
    _, smaller = _tiny_facts(seq, precision, vocab_size=20000)
    _, larger = _tiny_facts(seq, precision, vocab_size=30000)
    for ckpt in (False, True):
        more = larger.activations[ckpt, False].per_sequence - smaller.activations[ckpt, False].per_sequence
        per_logit = more / (seq * 10000)
        print(f"{precision}, checkpointing {ckpt}: {per_logit:.4f} bytes per logit")
        assert abs(per_logit - 12) < 0.05


def test_checkpointing_peak_includes_one_recomputed_layer():
    # with checkpointing the backward recomputes one layer at a time: the peak holds more than the layer inputs
    # (what checkpointing keeps: ~ L x N x E x 4 per sequence) and less than the full set
    config, facts = _tiny_facts(seq=1024)
    layer_inputs = config.num_hidden_layers * 1024 * config.hidden_size * 4
    assert layer_inputs < facts.activations[True, False].per_sequence < facts.activations[False, False].per_sequence


def _hand_facts(act_per_sequence=0.0, act_with_grads_per_sequence=0.0, persistent=0):
    peaks = {(ckpt, grads): planner.StepPeak(0.0, act_with_grads_per_sequence if grads else act_per_sequence)
             for ckpt in (False, True) for grads in (False, True)}
    return planner.ModelFacts(num_params=1000, largest_layer_params=100, persistent_params=persistent,
                              gathered_modules=1, num_layers=2, activations=peaks)


def test_the_total_is_the_larger_of_the_activation_peak_and_the_end_of_the_backward():
    # ZeRO-0, fp32, P = 1000, 2 ranks: params 4000 + AdamW 8000 always; then either the activation peak (with the
    # gradients made by then) or, at the end of the backward, the 4000 bytes of gradients + the 4000-byte flat copy
    # DeepSpeed all-reduces
    big = planner.memory_breakdown(_hand_facts(5000, 6000), 0, 2, 2, False, "fp32", allowance=False)
    assert big["total"] == 4000 + 8000 + 2 * 6000
    small = planner.memory_breakdown(_hand_facts(1000, 1500), 0, 2, 2, False, "fp32", allowance=False)
    assert small["total"] == 4000 + 8000 + 4000 + 4000


def test_zero3_holds_its_gradient_partition_buckets_and_gathered_weights_beside_the_activations():
    # ZeRO-3, fp32, P = 1000, largest layer 100, 2 ranks, 10 persistent elements: params 4P/2 + 4 x 100, grads 4P/2
    # (kept between steps), AdamW 8P/2; buffers beside the activations: the reduction buckets as far as the
    # gradients fill them on a CPU (P x 4), all weights gathered (P x 4, under DeepSpeed's 1e9 limits), the persistent
    # ones (10 x 4); activations without the gradients (they go into the partition)
    facts = _hand_facts(act_per_sequence=3000, act_with_grads_per_sequence=9999, persistent=10)
    m = planner.memory_breakdown(facts, 3, 2, 1, False, "fp32", allowance=False, device="cpu")
    assert m["buffers"] == 4000 + 4000 + 40
    assert m["total"] == (2000 + 400) + 2000 + 4000 + 3000 + m["buffers"]
    limited = planner.ZeroSettings(stage3_max_live_parameters=300, stage3_max_reuse_distance=200)
    assert planner.zero3_gathered_params(1000, limited) == 300  # the prefetch (50M) goes beyond the reuse limit
    assert planner.zero3_gathered_params(1000, planner.ZeroSettings(stage3_max_live_parameters=300,
                                                                    stage3_prefetch_bucket_size=100,
                                                                    stage3_max_reuse_distance=200)) == 200


def test_a_gpu_reserves_whole_reduction_buckets_a_cpu_only_the_pages_gradients_fill():
    # ZeRO-2, bf16 on a GPU: two buckets of reduce_bucket_size (overlap_comm) in bf16, allocated at the first
    # gradient, alive with the activations; on a CPU (fp32) the pages fill with the gradients (at most P x 4), after
    # the activation peak
    zero = planner.ZeroSettings(reduce_bucket_size=5000)
    gpu = planner.buffer_bytes(_hand_facts(), 2, "bf16", zero, "gpu")
    cpu = planner.buffer_bytes(_hand_facts(), 2, "fp32", zero, "cpu")
    assert gpu == (2 * 5000 * 2, 0.0) and cpu == (0.0, 1000 * 4)


def test_checkpointing_keeps_less_and_full_attention_more_than_sparse():
    # a small vocabulary, so that the attention and not the MLM head's logits make the peak
    _, sparse = _tiny_facts(seq=1024, vocab_size=512)
    _, full = _tiny_facts(seq=1024, attention_type="full", vocab_size=512)
    assert planner.activation_bytes(sparse, 2, True) < planner.activation_bytes(sparse, 2, False)
    # N^2 scores against ~N x 7 blocks
    assert full.activations[False, False].per_sequence > 1.5 * sparse.activations[False, False].per_sequence


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


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear line naming the option and the fix, exit status 2 (issue 25, cases 6 and 9)


_MEASURE = planner.model_facts


@functools.lru_cache(maxsize=None)
def _counted_facts(config_json: str, seq_len: int, precision: str, threshold: int):
    return _MEASURE(BigBirdJaConfig.from_dict(json.loads(config_json)), seq_len, precision, threshold)


@pytest.fixture
def plan_cli(capsys, monkeypatch):
    """`bigbird-ja plan` on the tiny model, in-process: (exit status, stdout, stderr). The activation count (a meta
    forward + backward) is made once per model and length for all these tests."""
    from bigbird_ja.cli import main
    from bigbird_ja.training.planner import search as planner  # plan_run looks model_facts up there

    monkeypatch.setattr(planner, "model_facts", lambda config, seq_len, precision, threshold=100_000: _counted_facts(
        config.to_json_string(), seq_len, precision, threshold))

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["plan", "--model", TINY, "--seq-len", "256", "--tokens", "1e9", "--gpu", "h100", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize("seq_len", [1025, 100_000])
def test_a_length_beyond_the_models_maximum_is_refused_naming_the_fix(plan_cli, seq_len):
    """Case 6: the planner raised max_position_embeddings to the length and printed a full plan for a model that
    refuses such inputs."""
    code, out, err = plan_cli("--seq-len", str(seq_len))
    assert code == 2 and "recommended" not in out, out[-500:]
    assert f"--seq-len {seq_len}" in err and "max_position_embeddings=1024" in err, err
    assert f"--model-override max_position_embeddings={seq_len}" in err, err
    with pytest.raises(ValueError, match=f"--seq-len {seq_len}"):
        planner.plan_run(TINY, seq_len, planner.resolve_gpu("h100"), 1, 8, 1e9)


def test_the_plan_is_of_the_model_as_given_and_an_override_lengthens_it():
    """A length below the maximum plans the model as it is (not one cut to the length); the override named in the
    refusal plans the longer model."""
    gpu = planner.resolve_gpu("h100")
    config = planner.plan_model_config(TINY, 256, {})
    assert config.max_position_embeddings == 1024  # the preset's, not max(256, 512)
    longer = planner.plan_run(TINY, 2048, gpu, 1, 8, 1e9, model_overrides={"max_position_embeddings": 2048})
    assert longer.recommended.fits and longer.seq_len == 2048


@pytest.mark.parametrize("micro_batch", ["0", "-3"])
def test_a_micro_batch_below_one_is_refused(plan_cli, micro_batch):
    """Case 6: --micro-batch 0 was ignored (the largest that fits was planned instead), a negative one planned."""
    code, out, err = plan_cli("--micro-batch", micro_batch)
    assert code == 2 and "recommended" not in out
    assert f"--micro-batch {micro_batch}" in err and "positive" in err, err


@pytest.mark.parametrize("option,value", [("--tokens", "inf"), ("--tokens", "nan"), ("--tokens", "-1"),
                                          ("--memory-gib", "0"), ("--peak-tflops", "0"), ("--peak-tflops", "nan"),
                                          ("--intra-node-gbps", "0"), ("--inter-node-gbps", "-5"),
                                          ("--compute-efficiency", "nan"), ("--nodes", "0"),
                                          ("--gpus-per-node", "-1"), ("--global-batch", "0")])
def test_a_number_out_of_range_is_refused_naming_the_option(plan_cli, option, value):
    """Case 9: --tokens inf raised OverflowError; --peak-tflops 0 ZeroDivisionError; nan went on to a plan."""
    code, out, err = plan_cli("--nodes", "2", f"{option}={value}")
    assert code == 2 and "recommended" not in out, out[-300:]
    assert option in err and "Traceback" not in err, err


def test_a_gpu_too_small_for_any_setting_is_refused_naming_the_options_that_change_it(plan_cli):
    """Found by the plan properties: --memory-gib 1 was refused ("no setting fits") without naming an option."""
    code, out, err = plan_cli("--memory-gib", "1")
    assert code == 2 and "no setting fits" in err and "--memory-gib" in err and "--nodes" in err, err


def test_write_and_json_out_into_a_missing_folder_or_onto_a_folder_name_the_path_and_the_fix(plan_cli, tmp_path):
    """Case 9: a missing folder gave an error about the hidden temporary file (.NAME.tmp-PID); a folder as the file
    raised IsADirectoryError with a traceback."""
    missing = tmp_path / "no" / "such" / "plan.yaml"
    for option in ("--write", "--json-out"):
        code, _, err = plan_cli(option, str(missing))
        assert code == 2 and str(missing) in err and "does not exist" in err and ".tmp-" not in err, err
        code, _, err = plan_cli(option, str(tmp_path))
        assert code == 2 and str(tmp_path) in err and "folder" in err and ".tmp-" not in err, err
    assert not list(tmp_path.rglob("*"))  # nothing left behind


def test_write_into_a_folder_without_permission_names_the_path(plan_cli, tmp_path, monkeypatch):
    """Case 9: a read-only folder gave PermissionError's traceback about the temporary file. (As root, a read-only
    mode does not stop a write: the file system's refusal is simulated where the file is opened.)"""
    import errno
    import os

    from bigbird_ja.common import atomic_io

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:
        def refuse(path, mode="r", *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        monkeypatch.setattr(atomic_io, "open", refuse, raising=False)
    try:
        for option in ("--write", "--json-out"):
            code, _, err = plan_cli(option, str(folder / "plan.yaml"))
            assert code == 2 and str(folder / "plan.yaml") in err and "permission" in err.lower(), err
            assert ".tmp-" not in err, err
    finally:
        folder.chmod(0o700)
    assert not list(folder.iterdir())
