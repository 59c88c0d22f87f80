"""The ONNX graph's length bounds, run by onnxruntime alone (issue 25, case 5), and the README's Deploy examples.

One tiny masked-LM graph is exported once for the module, as the README does it: a `bigbird-ja export` style folder
(model, tokenizer, checksums.json) at runs/tiny-cpu-model, `bigbird-ja export-onnx` from the README's own command
line. Inputs shorter than the traced minimum are padded inside the graph; longer than max_position_embeddings are
refused by onnxruntime with a message that names the maximum; nothing returns finite numbers it should not.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bigbird_ja
from bigbird_ja import deploy
from conftest import randomize_

onnxruntime = pytest.importorskip("onnxruntime", reason="optional: pip install onnxruntime (installed in .ci/run)")
pytest.importorskip("onnxscript", reason="optional: the dynamo ONNX exporter needs onnxscript")
pytestmark = pytest.mark.slow  # one export for the module (~20-40 s on 2 cores); each test after it is quick

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 256  # the tiny-cpu pretraining preset's max_position_embeddings
PADDED_TO = 2 * 32 + 1  # its traced length: one token past 2 global blocks of 32; shorter inputs are padded to it
TOLERANCE = 1e-4
_state = onnxruntime.capi.onnxruntime_pybind11_state
ORT_ERRORS = (_state.Fail, _state.InvalidArgument, _state.RuntimeException)  # the message says whether it is ours


def _deploy_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _deploy_section(), flags=re.S)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """(working folder, model) after the README's export-onnx command ran there on a tiny tiny-cpu-shaped model."""
    from transformers import AutoTokenizer

    from bigbird_ja.common.checksums import save_model_folder
    from bigbird_ja.configuration import build_model_config
    from bigbird_ja.tokenization import train_tokenizer

    work = tmp_path_factory.mktemp("deploy")
    corpus = Path(bigbird_ja.__file__).parent / "resources" / "sample_corpus" / "ja_sample.txt"
    train_tokenizer([corpus], work / "tokenizer", 2000, shrink_vocab=True, model_max_length=MAX_LENGTH, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    config = build_model_config(ROOT / "configs" / "model" / "tiny-cpu.yaml", {
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
        "max_position_embeddings": MAX_LENGTH, "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    model = randomize_(bigbird_ja.BigBirdJaForMaskedLM(config), seed=1).eval()
    save_model_folder(model, tokenizer, work / "runs" / "tiny-cpu-model")

    from bigbird_ja import cli

    [command] = [line.split("#", 1)[0] for block in _code_blocks("bash") for line in block.splitlines()
                 if line.startswith("bigbird-ja export-onnx")]
    argv = shlex.split(command)[1:]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        assert cli.main(argv) == 0
    assert (work / "runs" / "tiny-cpu-model.onnx").is_file()
    return work, model


@pytest.fixture(scope="module")
def session(graph):
    work, _ = graph
    return deploy.onnx_session(work / "runs" / "tiny-cpu-model.onnx")


def _eager_logits(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_readme_onnxruntime_example_runs_as_written(graph, session, monkeypatch):
    work, model = graph
    [example] = [block for block in _code_blocks("python") if "onnxruntime" in block]
    monkeypatch.chdir(work)
    scope: dict = {}
    exec(compile(example, "README.md (Deploy)", "exec"), scope)
    ids, logits = torch.from_numpy(scope["ids"]), torch.from_numpy(scope["logits"])
    assert ids.shape == (1, 14)  # as the README says; shorter than the traced length: padded inside the graph
    assert logits.shape == (*ids.shape, model.config.vocab_size)
    expected = _eager_logits(model, ids, torch.ones_like(ids))
    print("max |diff|", float((logits - expected).abs().max()))
    assert (logits - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("length", [MAX_LENGTH + 1, 300, 1000])
def test_onnxruntime_refuses_inputs_longer_than_max_position_embeddings_by_name(session, graph, length):
    ids = torch.randint(5, graph[1].config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with pytest.raises(ORT_ERRORS) as caught:
        session.run(None, {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})
    print(caught.value)
    assert f"1 to {MAX_LENGTH} tokens" in str(caught.value) and "max_position_embeddings" in str(caught.value)
    # The helper the project ships says it before onnxruntime is asked.
    with pytest.raises(ValueError, match=f"{length} tokens.*max_position_embeddings={MAX_LENGTH}"):
        deploy.run_onnx(session, ids, torch.ones_like(ids))


@pytest.mark.parametrize("case", ["no tokens", "mask of another length", "mask of one row (broadcast)", "negative id",
                                  "id past the vocabulary"])
def test_onnxruntime_refuses_inputs_that_mean_nothing_by_name(session, graph, case):
    vocab = graph[1].config.vocab_size
    ids = torch.randint(5, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    expected = "1 to" if case == "no tokens" else "attention_mask" if case.startswith("mask") else "vocab_size"
    if case == "no tokens":
        ids, mask = ids[:, :0], mask[:, :0]
    elif case == "mask of another length":
        mask = mask[:, :39]
    elif case == "mask of one row (broadcast)":
        mask = mask[:1]
    else:
        ids[1, 7] = -1 if case == "negative id" else vocab
    with pytest.raises(ORT_ERRORS, match=expected) as caught:
        session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    print(caught.value)
    with pytest.raises(ValueError, match=expected):
        deploy.run_onnx(session, ids, mask)


def test_graph_metadata_states_the_bounds_it_enforces(session):
    description = deploy.onnx_description(session)
    assert (description["min_length"], description["padded_to"], description["max_length"]) == (1, PADDED_TO,
                                                                                                 MAX_LENGTH)
    assert "padded inside the graph" in description["shorter_inputs"]
    assert "refused" in description["longer_inputs"]


# ----------------------------------------------------------------------------------------------------------------
# Property: over lengths from 1 to far past the maximum, batch sizes 1-3 and random padding, onnxruntime matches
# PyTorch within the error budget or refuses by name; never an internal error, never finite numbers past the maximum.

TRIED: list[tuple[int, int, str, float]] = []  # (length, batch, what happened, max |diff|) per input, for the summary
REGIONS = {"padded": (1, PADDED_TO - 1), "matched": (PADDED_TO, MAX_LENGTH),
           "refused": (MAX_LENGTH + 1, 4 * MAX_LENGTH)}


@st.composite
def batches(draw):
    # Half the inputs inside the traced range, a quarter padded up to it, a quarter too long.
    low, high = REGIONS[draw(st.sampled_from(["padded", "matched", "matched", "refused"]))]
    length = draw(st.integers(low, high))
    batch = draw(st.integers(1, 3))
    real = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))  # real tokens per row
    seed = draw(st.integers(0, 2**31 - 1))
    return length, real, seed


@settings(max_examples=60, deadline=None, database=None)
@given(case=batches())
def test_property_onnx_matches_pytorch_inside_the_bounds_and_refuses_by_name_outside(session, graph, case):
    model = graph[1]
    length, real, seed = case
    ids = torch.randint(5, model.config.vocab_size, (len(real), length), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(length)[None] < torch.tensor(real)[:, None]).long()
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if length > MAX_LENGTH:
        with pytest.raises(ORT_ERRORS) as caught:
            session.run(None, feeds)
        assert f"1 to {MAX_LENGTH} tokens" in str(caught.value), caught.value
        with pytest.raises(ValueError, match=f"max_position_embeddings={MAX_LENGTH}"):
            deploy.run_onnx(session, ids, mask)
        TRIED.append((length, len(real), "refused", 0.0))
        return
    got = torch.from_numpy(session.run(None, feeds)[0])
    expected = _eager_logits(model, ids, mask)
    assert got.shape == expected.shape
    worst = float((got - expected).abs()[mask.bool()].max())
    assert worst <= TOLERANCE, (length, real, worst)  # NaN fails too
    TRIED.append((length, len(real), "padded" if length < PADDED_TO else "matched", worst))


def test_property_summary():
    """Runs after the property test (file order): what it tried, for the record."""
    if not TRIED:
        pytest.skip("the property test did not run")
    kinds = {kind: sum(1 for _, _, k, _ in TRIED if k == kind) for kind in ("padded", "matched", "refused")}
    print(f"{len(TRIED)} inputs: {kinds}; lengths {min(t[0] for t in TRIED)}-{max(t[0] for t in TRIED)}; worst "
          f"|onnxruntime - PyTorch| {max(t[3] for t in TRIED):.1e}")
    assert len(TRIED) >= 30
