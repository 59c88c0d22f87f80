"""The long-document QA pipeline (`pipeline("long-document-question-answering")`, bigbird_ja.pipelines).

Agreement, not accuracy: a tiny random QA model saved as `bigbird-ja finetune` saves one (<run>/model beside
<run>/config.yaml) answers a few JSQuAD articles through `bigbird-ja evaluate --model` and through the pipeline,
and the answers must be the same. The tokenizer and the JSQuAD subsets are test_finetune.py's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import bigbird_ja
from bigbird_ja import cli
from bigbird_ja.configuration import build_model_config
from bigbird_ja.finetune import load_finetune_config
from bigbird_ja.finetune.documents import build_qa_examples
from bigbird_ja.finetune.jglue import read_squad
from bigbird_ja.pipelines import QA_TASK
from conftest import randomize_
from test_finetune import JSQUAD, REPO, _squad_subset, jsquad_raw, tokenizer_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not JSQUAD.is_file(), reason="JGLUE data not found beside the repository")

# Windows of 192 tokens (12 blocks of 16: sparse) over documents of up to ~600 tokens, 48 tokens of overlap.
RUN_SETTINGS = ["--data.max_length=192", "--data.doc_stride=48", "--data.max_query_length=29",
                "--eval.n_best=10", "--eval.max_answer_tokens=20", "--eval.batch_size=1"]
ARTICLES = (11, 12, 16)  # 享保, 打楽器, アムハラ語: 46 questions


def _tiny_qa_model(tokenizer_dir: Path, folder: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = build_model_config(REPO / "configs" / "model" / "tiny-cpu.yaml", {
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "block_size": 16,
        "num_random_blocks": 1, "max_position_embeddings": 256, "vocab_size": len(tokenizer)})
    model = randomize_(bigbird_ja.BigBirdJaForQuestionAnswering(config), seed)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def run_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A run folder as `bigbird-ja finetune` leaves it: config.yaml (the window settings) and model/."""
    run = tmp_path_factory.mktemp("qa-run")
    _tiny_qa_model(tokenizer_dir, run / "model")
    (run / "config.yaml").write_text(load_finetune_config(None, RUN_SETTINGS).to_yaml(), encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def subset(jsquad_raw, tmp_path_factory) -> Path:
    return _squad_subset([jsquad_raw[i] for i in ARTICLES], tmp_path_factory.mktemp("qa-data") / "valid.json")


@pytest.fixture(scope="module")
def qa(run_dir):
    from transformers import pipeline

    return pipeline(QA_TASK, model=str(run_dir / "model"), device="cpu")


@pytest.fixture(scope="module")
def examples(subset):
    return build_qa_examples(read_squad(subset), long_document=True)[0]


def test_the_task_is_registered_by_importing_bigbird_ja():
    from transformers.pipelines import PIPELINE_REGISTRY, get_supported_tasks

    assert QA_TASK in get_supported_tasks()
    assert PIPELINE_REGISTRY.check_task(QA_TASK)[1]["impl"] is bigbird_ja.LongDocumentQuestionAnsweringPipeline


def test_pipeline_answers_exactly_as_bigbird_ja_evaluate_on_long_jsquad_documents(qa, run_dir, subset, examples,
                                                                                   tmp_path):
    out = tmp_path / "predictions.json"
    assert cli.main(["evaluate", "jsquad", "--model", str(run_dir / "model"), "--data", str(subset),
                     "--predictions-out", str(out)]) == 0  # reads <run>/config.yaml, as the pipeline does
    expected = json.loads(out.read_text(encoding="utf-8"))
    settings = qa.qa_settings
    assert (settings.max_length, settings.doc_stride, settings.max_query_length) == (192, 48, 29)
    assert (settings.n_best, settings.max_answer_tokens) == (10, 20)
    windows = [len(list(qa.preprocess({"question": e.question, "context": e.context}))) for e in examples]
    assert max(windows) >= 4 and min(windows) == 1  # long documents and one that fits in a window
    answers = qa([{"question": e.question, "context": e.context} for e in examples])
    assert len(answers) == len(examples) == len(expected) == 46
    for example, answer in zip(examples, answers):
        assert answer["answer"] == expected[example.id], example.id
        assert example.context[answer["start"]:answer["end"]] == answer["answer"]
        assert math.isfinite(answer["score"])
    print(f"\n{len(examples)} questions, {sum(windows)} windows: pipeline == bigbird-ja evaluate")


def test_top_k_gives_k_distinct_answers_best_first(qa, examples):
    example = next(e for e in examples if len(e.context) > 800)
    inputs = {"question": example.question, "context": example.context}
    best = qa(inputs)
    top = qa(inputs, top_k=5)
    assert isinstance(best, dict) and isinstance(top, list) and len(top) == 5
    assert top[0] == best
    scores = [a["score"] for a in top]
    assert scores == sorted(scores, reverse=True)
    assert len({(a["start"], a["end"]) for a in top}) == 5
    for answer in top:
        assert example.context[answer["start"]:answer["end"]] == answer["answer"]
    assert qa(inputs, top_k=1) == best


def test_a_batch_of_two_equals_one_at_a_time_whatever_the_batch_size(qa, examples):
    long, short = (next(e for e in examples if len(e.context) > 800), next(e for e in examples
                                                                            if len(e.context) < 300))
    inputs = [{"question": e.question, "context": e.context} for e in (long, short)]
    alone = [qa(x, top_k=3) for x in inputs]
    assert qa(inputs, top_k=3) == alone
    # windows of several questions in one forward pass, run in groups of equal length (never padded)
    for batched, single in zip(qa(inputs, top_k=3, batch_size=8), alone):
        assert [(a["answer"], a["start"], a["end"]) for a in batched] == \
            [(a["answer"], a["start"], a["end"]) for a in single]
        assert [a["score"] for a in batched] == pytest.approx([a["score"] for a in single], abs=1e-4)
    assert qa(question=inputs[0]["question"], context=inputs[0]["context"]) == alone[0][0]
    assert qa(question=[x["question"] for x in inputs], context=[x["context"] for x in inputs]) == \
        [a[0] for a in alone]


def test_call_parameters_override_the_runs_settings(qa, examples):
    example = next(e for e in examples if len(e.context) > 800)
    inputs = {"question": example.question, "context": example.context}
    assert len(list(qa.preprocess(inputs))) > len(list(qa.preprocess(inputs, max_length=256, doc_stride=16)))
    answer = qa(inputs, max_length=256, doc_stride=16, max_answer_tokens=3)
    assert example.context[answer["start"]:answer["end"]] == answer["answer"]
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        qa(inputs, max_length=512)
    with pytest.raises(ValueError, match="top_k"):
        qa(inputs, top_k=0)
    with pytest.raises(ValueError, match="'question' and 'context'"):
        qa({"question": "x", "text": "y"})


def test_without_a_run_config_the_defaults_are_fine_tunings(tokenizer_dir, tmp_path):
    from transformers import pipeline

    from bigbird_ja.finetune.config import DataSection, EvalSection

    folder = _tiny_qa_model(tokenizer_dir, tmp_path / "bare", seed=1)
    qa = pipeline(QA_TASK, model=str(folder), device="cpu")
    data, evaluation = DataSection(), EvalSection()
    assert qa.qa_settings.doc_stride == data.doc_stride and qa.qa_settings.max_query_length == data.max_query_length
    assert (qa.qa_settings.n_best, qa.qa_settings.max_answer_tokens) == (evaluation.n_best,
                                                                        evaluation.max_answer_tokens)
    with pytest.raises(ValueError, match="max_length=4096.*max_position_embeddings=256"):
        qa({"question": "質問?", "context": "本文。"})  # 4,096-token windows do not fit this model
    answer = qa({"question": "質問?", "context": "本文。"}, max_length=256, doc_stride=64)
    assert set(answer) == {"answer", "start", "end", "score"}
    assert qa({"question": "質問?", "context": ""}, max_length=256, doc_stride=64) == \
        {"answer": "", "start": 0, "end": 0, "score": -math.inf}  # as bigbird-ja evaluate answers an empty context


def test_a_saved_pipeline_loads_again_without_remote_code(qa, examples, tmp_path):
    from transformers import pipeline

    qa.save_pretrained(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text(encoding="utf-8"))
    assert "custom_pipelines" not in config and not (tmp_path / "saved" / "pipelines.py").exists()
    again = pipeline(QA_TASK, model=str(tmp_path / "saved"), device="cpu", max_length=192, doc_stride=48,
                     max_query_length=29, n_best=10, max_answer_tokens=20)
    inputs = {"question": examples[0].question, "context": examples[0].context}
    assert again(inputs) == qa(inputs)
    torch.testing.assert_close(again.model.qa_outputs.weight, qa.model.qa_outputs.weight, rtol=0, atol=0)
