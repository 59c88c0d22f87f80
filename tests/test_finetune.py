"""Fine-tuning and evaluation: long-document JSQuAD, the JGLUE metric, JNLI / JSTS / JCommonsenseQA runs, and the
generated long-range QA task.

Data: the JGLUE v1.3 files in ../shared/data/jglue (never copied here, nothing downloaded). One Japanese tokenizer
is trained per session (vocabulary 8,000, a few seconds) on the JSQuAD paragraphs of the even-numbered articles
plus JSTS train, JNLI test and JCommonsenseQA train sentences, exactly as tests/test_tokenizer.py does. Models are
tiny and random (configs/model/tiny-cpu.yaml shrunk by overrides): the runs check the plumbing and the files they
write, not accuracy, except the long-range task, whose model is trained from scratch to solve it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

from bigbird_ja import cli
from bigbird_ja.finetune import finetune, load_finetune_config
from bigbird_ja.finetune.config import ConfigError, FinetuneConfig
from bigbird_ja.finetune.documents import build_qa_examples
from bigbird_ja.finetune.jglue import (
    DataFormatError, read_jcommonsenseqa, read_jnli, read_jsts, read_marc_ja, read_squad,
)
from bigbird_ja.finetune.metrics import normalize_answer, pearson, spearman, squad_scores
from bigbird_ja.finetune.run import evaluate_model, evaluate_predictions
from bigbird_ja.finetune.trainer import batch_order
from bigbird_ja.qa.features import answer_token_span, build_qa_features, tokenize_document, window_starts
from bigbird_ja.qa.prediction import predict_answers

REPO = Path(__file__).resolve().parents[1]
JGLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "jglue"
JSQUAD = JGLUE / "jsquad-v1.3" / "valid-v1.3.json"
JNLI = JGLUE / "jnli-v1.3"
JSTS = JGLUE / "jsts-v1.3"
JCQA = JGLUE / "jcommonsenseqa-v1.3"
PRESETS = sorted((REPO / "configs" / "finetune").glob("*.yaml"))
VOCAB_SIZE = 8000
CHOICES = ["question"] + [f"choice{i}" for i in range(5)]

pytestmark = pytest.mark.skipif(not JSQUAD.is_file(), reason=f"JGLUE data not found at {JGLUE} (shared/ is laid "
                                                              f"beside the repository)")

# A tiny random model for the plumbing runs: 32 wide, 2 layers, blocks of 16 (so 128-token inputs are sparse).
TINY_MODEL = [
    f"--model.preset={REPO / 'configs' / 'model' / 'tiny-cpu.yaml'}",
    "--model.overrides.hidden_size=32", "--model.overrides.intermediate_size=64",
    "--model.overrides.num_attention_heads=2", "--model.overrides.max_position_embeddings=512",
    "--model.overrides.block_size=16", "--model.overrides.num_global_blocks=1",
    "--model.overrides.num_random_blocks=1",
    "--train.lr=1e-3", "--train.batch_size=8", "--train.progress_bar=false", "--train.seed=0",
]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _squad_subset(articles: list[dict], path: Path) -> Path:
    path.write_text(json.dumps({"version": "v1.3-subset", "data": articles}, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def jsquad_raw() -> list[dict]:
    return json.loads(JSQUAD.read_text(encoding="utf-8"))["data"]


@pytest.fixture(scope="session")
def tokenizer_dir(jsquad_raw, tmp_path_factory) -> Path:
    """The project's tokenizer, trained as in test_tokenizer.py (even articles + the other tasks' train splits)."""
    from bigbird_ja.tokenization import train_tokenizer

    lines = []
    for article in jsquad_raw[0::2]:
        lines.append(article["title"])
        lines += [p["context"].split(" [SEP] ", 1)[-1] for p in article["paragraphs"]]
    for path, keys in ((JSTS / "train-v1.3.json", ["sentence1", "sentence2"]),
                       (JNLI / "test-v1.3.json", ["sentence1", "sentence2"]),
                       (JCQA / "train-v1.3.json", CHOICES)):
        lines += [row[k] for row in _read_jsonl(path) for k in keys]
    work = tmp_path_factory.mktemp("finetune-tokenizer")
    corpus = work / "train.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_tokenizer([corpus], work / "tok", vocab_size=VOCAB_SIZE)
    return work / "tok"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def long_documents():
    return build_qa_examples(read_squad(JSQUAD), long_document=True)


def _gold_token_spans(examples, docs) -> dict[int, tuple[int, int]]:
    """Example index -> (first, last) document tokens of a gold answer that token offsets recover exactly."""
    spans = {}
    for index, example in enumerate(examples):
        for answer in example.answers:
            found = answer_token_span(docs[example.document_id], answer.start, answer.end)
            if found is not None and found[2]:
                spans[index] = found[:2]
                break
    return spans


def _gold_logits(features, spans) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits that point at the gold tokens in every window holding them, and are flat elsewhere."""
    starts, ends = [], []
    for f in features:
        s, e = np.zeros(len(f.input_ids)), np.zeros(len(f.input_ids))
        span = spans.get(f.example_index)
        if span is not None and f.doc_token_start <= span[0] and span[1] < f.doc_token_start + f.num_context_tokens:
            s[f.context_start + span[0] - f.doc_token_start] = 10.0
            e[f.context_start + span[1] - f.doc_token_start] = 10.0
        starts.append(s)
        ends.append(e)
    return starts, ends


# ----------------------------------------------------------------------------------------------------------------
# Long-document JSQuAD


def test_long_documents_join_each_articles_paragraphs_and_every_answer_offset_checks(long_documents, jsquad_raw):
    examples, report = long_documents
    print("\n" + report.summary())
    assert report.documents == len(jsquad_raw) == 59
    assert report.questions == len(examples) == 4442
    assert report.answers_checked == 12853 and not report.mismatches and not report.empty_contexts
    for article in jsquad_raw:
        joined = "\n".join(p["context"] for p in article["paragraphs"])
        ids = {qa["id"] for p in article["paragraphs"] for qa in p["qas"]}
        mine = [e for e in examples if e.id in ids]
        assert len(mine) == len(ids) and all(e.context == joined for e in mine)
    for example in examples:
        assert example.answers, example.id
        for answer in example.answers:
            assert example.context[answer.start:answer.end] == answer.text
    assert max(report.document_chars) > 30000  # the longest article needs many 4,096-token windows


def test_paragraph_task_is_the_same_code_with_one_paragraph_per_document(jsquad_raw):
    examples, report = build_qa_examples(read_squad(JSQUAD), long_document=False)
    assert report.documents == sum(len(a["paragraphs"]) for a in jsquad_raw) == 1145
    by_id = {qa["id"]: (p["context"], qa) for a in jsquad_raw for p in a["paragraphs"] for qa in p["qas"]}
    for example in examples:
        context, qa = by_id[example.id]
        assert example.context == context
        assert [(a.text, a.start) for a in example.answers] == list(dict.fromkeys(
            (a["text"], a["answer_start"]) for a in qa["answers"]))


def test_gold_answers_are_recoverable_from_token_offsets_for_at_least_99_5_percent(long_documents, tokenizer):
    examples, _ = long_documents
    _, docs, _ = build_qa_features(examples, tokenizer, max_length=4096, doc_stride=512)
    spans = _gold_token_spans(examples, docs)
    rate = len(spans) / len(examples)
    missed = [e.id for i, e in enumerate(examples) if i not in spans]
    print(f"\nanswer recoverable from token offsets: {len(spans)}/{len(examples)} = {100 * rate:.2f}% "
          f"(not: {missed[:10]})")
    assert rate >= 0.995


@pytest.mark.parametrize("max_length,doc_stride", [(4096, 512), (512, 128)], ids=["4096", "512"])
def test_prediction_fed_the_gold_tokens_scores_exact_match_100(long_documents, tokenizer, max_length, doc_stride):
    """Windowing, the best span over all windows and the mapping back to characters, without a model."""
    examples, _ = long_documents
    features, docs, report = build_qa_features(examples, tokenizer, max_length=max_length, doc_stride=doc_stride)
    print("\n" + report.summary())
    assert report.documents_over_one_window >= (12 if max_length == 4096 else 40)
    spans = _gold_token_spans(examples, docs)
    starts, ends = _gold_logits(features, spans)
    predictions = predict_answers(examples, features, docs, starts, ends, max_answer_tokens=200)
    recoverable = {e.id: e.gold_texts for i, e in enumerate(examples) if i in spans}
    scores = squad_scores({k: p.text for k, p in predictions.items()}, recoverable)
    everything = squad_scores({k: p.text for k, p in predictions.items()},
                              {e.id: e.gold_texts for e in examples})
    print(f"gold tokens -> EM {scores['exact_match']:.2f} on the {scores['total']} recoverable questions, "
          f"EM {everything['exact_match']:.2f} / F1 {everything['f1']:.2f} on all {everything['total']}")
    assert scores["exact_match"] == 100.0 and scores["f1"] == 100.0
    for i, example in enumerate(examples):  # the exact characters of the original context, not a re-decoding
        if i in spans:
            p = predictions[example.id]
            assert example.context[p.start:p.end] == p.text
            assert any(a.start == p.start and a.end == p.end for a in example.answers)


def test_windows_put_the_question_first_and_match_the_tokenizers_own_pair_encoding(tokenizer):
    examples, _ = build_qa_examples(read_squad(JSQUAD), long_document=False)
    features, _, _ = build_qa_features(examples[:50], tokenizer, max_length=4096, doc_stride=64)
    for feature in features:
        example = examples[feature.example_index]
        pair = tokenizer(example.question, example.context)
        assert feature.input_ids == pair["input_ids"]
        assert feature.token_type_ids == pair["token_type_ids"]


def test_windows_overlap_by_doc_stride_and_the_last_one_reaches_the_end():
    assert window_starts(10, 4, 1) == [0, 3, 6]  # 0-3, 3-6, 6-9: the last one ends at the end
    assert window_starts(4, 4, 1) == [0]
    assert window_starts(0, 4, 1) == [0]
    assert window_starts(100, 10, 5, truncate=True) == [0]
    starts = window_starts(1000, 100, 30)
    assert all(b - a == 70 for a, b in zip(starts, starts[1:])) and starts[-1] + 100 >= 1000 > starts[-2] + 100
    with pytest.raises(ValueError, match="doc_stride"):
        window_starts(100, 10, 10)


def test_a_composed_half_width_character_keeps_its_absorbed_mark_in_the_answer(tokenizer):
    """NFKC turns "ｶﾞ" into one character whose offset covers "ｶ" only; the answer still ends after "ﾞ"."""
    context = "商品名はｶﾞｷﾞｸﾞです。"
    doc = tokenize_document(tokenizer, context)
    start = context.index("ｶﾞｷﾞ")
    first, last, exact = answer_token_span(doc, start, start + 4)
    assert exact
    assert context[doc.offsets[first][0]:doc.ends[last]] == "ｶﾞｷﾞ"
    spaced = tokenize_document(tokenizer, "東京 と 大阪")  # a space is a token of its own: no end crosses it
    assert all(end == e for (_, e), end in zip(spaced.offsets, spaced.ends))


# ----------------------------------------------------------------------------------------------------------------
# The JSQuAD metric


@pytest.mark.parametrize("prediction,golds,em,f1", [
    ("東京", ["東京"], 1.0, 1.0),
    ("東京。", ["東京"], 1.0, 1.0),  # a trailing "。" is stripped
    ("東京。。", ["東京"], 1.0, 1.0),  # all of them (str.rstrip)
    ("東京。 ", ["東京"], 0.0, 0.8),  # stripped before whitespace is collapsed: "東京。" vs "東京" -> 2/3, 2/2
    ("。東京", ["東京"], 0.0, 0.8),  # a leading "。" stays
    ("Tokyo  Tower", ["tokyo tower"], 1.0, 1.0),  # lower-case, whitespace collapsed
    (" 東 京 ", ["東 京"], 1.0, 1.0),
    ("東京、大阪", ["東京大阪"], 0.0, 2 * (4 / 5) * 1.0 / (4 / 5 + 1.0)),  # punctuation kept (and counted)
    ("東京都", ["東京"], 0.0, 0.8),  # 2 of 3 predicted characters, 2 of 2 gold: P 2/3, R 1 -> 0.8
    ("京東", ["東京"], 0.0, 1.0),  # a multiset of characters: order does not matter
    ("大阪", ["東京"], 0.0, 0.0),
    ("東京タワー", ["東京", "東京タワー", "タワー"], 1.0, 1.0),  # the max over several golds
    ("タワー", ["東京タワー", "大阪"], 0.0, 2 * 1.0 * 0.6 / 1.6),
    ("", ["東京"], 0.0, 0.0),
    ("", ["。"], 1.0, 1.0),  # a gold that normalises to "" is dropped; all dropped -> the gold is ""
])
def test_jsquad_metric_matches_hand_computed_cases(prediction, golds, em, f1):
    scores = squad_scores({"q": prediction}, {"q": golds})
    assert scores["total"] == 1
    assert scores["exact_match"] == pytest.approx(100 * em)
    assert scores["f1"] == pytest.approx(100 * f1)


def test_jsquad_metric_is_the_mean_over_questions_and_a_missing_prediction_scores_zero():
    golds = {"a": ["東京"], "b": ["大阪"], "c": ["京都"], "d": ["奈良"]}
    scores = squad_scores({"a": "東京", "b": "大阪府", "c": "x", "unknown": "y"}, golds)
    assert scores["total"] == 4
    assert scores["exact_match"] == pytest.approx(25.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0 + 0) / 4)
    assert normalize_answer(" Ａ。\u3000b。") == "ａ。 b"  # full-width letters lower-case; U+3000 is whitespace


def test_evaluate_cli_scores_a_predictions_file_and_reports_missing_and_unknown_ids(tmp_path, capsys):
    golds = {qa["id"]: qa for a in json.loads(JSQUAD.read_text(encoding="utf-8"))["data"]
             for p in a["paragraphs"] for qa in p["qas"]}
    ids = list(golds)
    predictions = {i: golds[i]["answers"][0]["text"] + "。" for i in ids[:-3]}  # trailing 。 still exact
    predictions["not-a-question"] = "x"
    pred_path = tmp_path / "predictions.json"
    pred_path.write_text(json.dumps(predictions, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "metrics.json"
    assert cli.main(["evaluate", "jsquad", "--predictions", str(pred_path), "--data", str(JSQUAD),
                     "--metrics-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 gold questions without a prediction" in printed and ids[-1] in printed
    assert "1 predicted ids not in the gold file" in printed and "not-a-question" in printed
    metrics = json.loads(out.read_text(encoding="utf-8"))
    assert set(metrics) == {"exact_match", "f1", "total"}
    assert metrics["total"] == 4442
    assert metrics["exact_match"] == pytest.approx(100 * 4439 / 4442)


def _capture_finetune(monkeypatch) -> dict:
    """Replace the library's `finetune` (what `bigbird-ja finetune` calls) by one that records its arguments."""
    seen: dict = {}

    def fake(task, config=None, **kwargs):
        seen.update(task=task, config=config, **kwargs)

    monkeypatch.setattr("bigbird_ja.finetune.finetune", fake)
    return seen


def test_finetune_data_files_are_train_file_and_valid_file_and_train_dot_is_left_to_overrides(monkeypatch, capsys):
    seen = _capture_finetune(monkeypatch)
    assert cli.main(["finetune", "jnli", "--train-file", "t.json", "--valid-file", "v.json", "--out", "run",
                     "--train.epochs=3", "--data.max_length", "64"]) == 0
    assert (seen["train"], seen["valid"], seen["output"]) == ("t.json", "v.json", "run")
    assert seen["overrides"] == ["--train.epochs=3", "--data.max_length", "64"]
    for old, new in [("--train", "--train-file"), ("--valid", "--valid-file"), ("--train-f", "--train-file")]:
        with pytest.raises(SystemExit) as exit_:  # neither taken for an override nor abbreviated
            cli.main(["finetune", "jnli", old, "t.json"])
        assert exit_.value.code == 2
        assert f"unrecognized option {old}; did you mean {new}?" in capsys.readouterr().err


def test_options_that_name_what_a_command_writes_are_spelled_out():
    parser = cli.build_parser()
    options = {name: [o for a in sub._actions for o in a.option_strings] for name, sub in parser.subcommands.items()}
    assert not [(name, o) for name, opts in options.items() for o in opts if o.startswith("--output")]
    assert {"--metrics-out", "--predictions-out"} <= set(options["evaluate"])
    assert all("--out" in options[name] for name in ("layout", "train-tokenizer", "prepare", "finetune"))


def test_user_errors_exit_2_with_one_line_and_other_runtime_errors_keep_their_traceback(monkeypatch, capsys):
    from bigbird_ja.training.preflight import PreflightError

    def failing(error):
        def fake(*args, **kwargs):
            raise error
        return fake

    monkeypatch.setattr("bigbird_ja.finetune.finetune", failing(ConfigError("data.max_length=1: must be >= 2")))
    assert cli.main(["finetune", "jnli"]) == 2
    assert capsys.readouterr().err.strip() == "bigbird-ja finetune: error: data.max_length=1: must be >= 2"
    monkeypatch.setattr("bigbird_ja.finetune.finetune", failing(PreflightError("[rank 0] too few open files")))
    assert cli.main(["finetune", "jnli"]) == 2
    for error in (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  RuntimeError("NCCL error in: ProcessGroupNCCL.cpp, unhandled system error")):
        monkeypatch.setattr("bigbird_ja.finetune.finetune", failing(error))
        with pytest.raises(RuntimeError) as raised:
            cli.main(["finetune", "jnli"])
        assert raised.value is error and raised.value.__traceback__ is not None


def test_evaluate_rejects_a_predictions_file_that_is_not_an_id_to_text_object(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps([{"id": "a", "text": "b"}]), encoding="utf-8")
    with pytest.raises(ValueError, match="one JSON object mapping id"):
        evaluate_predictions("jsquad", bad, JSQUAD)
    bad.write_text(json.dumps({"a10336p0q0": ["小笠原諸島"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="not strings"):
        evaluate_predictions("jsquad", bad, JSQUAD)


def test_correlations_match_hand_computed_values():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy, ties averaged
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def _article(title: str, paragraphs: list[tuple[str, list[tuple[str, str, int]]]]) -> dict:
    return {"title": title, "paragraphs": [
        {"context": context, "qas": [{"id": qid, "question": f"{qid}?", "answers": [{"text": t, "answer_start": s}]}
                                     for qid, t, s in qas]} for context, qas in paragraphs]}


def test_answers_whose_offsets_do_not_match_are_reported_by_id_never_dropped_silently(tmp_path):
    path = _squad_subset([_article("t", [("東京は日本の首都です。", [("good", "東京", 0), ("bad", "日本", 0)]),
                                         ("大阪は西にある。", [("shifted", "西", 0)])])], tmp_path / "bad.json")
    with pytest.raises(DataFormatError) as err:
        build_qa_examples(read_squad(path))
    assert "2 answer(s)" in str(err.value) and "bad" in str(err.value) and "shifted" in str(err.value)
    examples, report = build_qa_examples(read_squad(path), on_mismatch="skip")
    assert [m.id for m in report.mismatches] == ["bad", "shifted"]
    assert "offset mismatches: 2" in report.summary()
    by_id = {e.id: e for e in examples}
    assert len(examples) == 3  # kept for evaluation: the metric compares texts
    assert by_id["bad"].answers == [] and by_id["bad"].gold_texts == ["日本"]
    assert by_id["good"].answers[0].start == 0
    with pytest.raises(ConfigError, match="on_mismatch"):
        load_finetune_config(None, ["--data.on_mismatch=ignore"])


def test_empty_contexts_are_reported_and_their_questions_get_the_empty_answer(tmp_path, tokenizer):
    path = _squad_subset([_article("t", [("", [("empty", "x", 0)]), ("東京は首都。", [("ok", "東京", 0)])]),
                          _article("u", [("", [])])], tmp_path / "empty.json")
    examples, report = build_qa_examples(read_squad(path), long_document=False, on_mismatch="skip")
    assert len(report.empty_contexts) == 2 and "t / paragraph 0 (1 questions)" in report.empty_contexts[0]
    train, _, train_report = build_qa_features(examples, tokenizer, max_length=64, doc_stride=8,
                                               max_query_length=16, training=True)
    assert train_report.unlabelled == ["empty"] and len(train) == 1
    features, docs, _ = build_qa_features(examples, tokenizer, max_length=64, doc_stride=8, max_query_length=16)
    starts = [np.zeros(len(f.input_ids)) for f in features]
    predictions = predict_answers(examples, features, docs, starts, starts)
    assert predictions["empty"].text == ""
    long_examples, long_report = build_qa_examples(read_squad(path), long_document=True, on_mismatch="skip")
    assert [e.context for e in long_examples if e.id == "ok"] == ["東京は首都。"]  # nothing joined for ""


def test_a_document_longer_than_any_window_is_windowed_and_answered_from_its_last_window(tokenizer):
    filler = "これは長い文書の一文です。" * 200
    context = filler + "答えは富士山です。"
    path_examples, _ = build_qa_examples([_sq("long", context, "富士山", context.index("富士山"))])
    features, docs, report = build_qa_features(path_examples, tokenizer, max_length=128, doc_stride=32,
                                               max_query_length=16, training=True)
    assert report.max_windows == len(features) > 10 and report.documents_over_one_window == 1
    labelled = [f for f in features if f.start_position > 0]
    assert len(labelled) >= 1 and labelled[-1] is features[-1]  # only the last window(s) hold the answer
    assert all(f.start_position == f.end_position == 0 for f in features if f not in labelled)  # [CLS]
    eval_features, docs, _ = build_qa_features(path_examples, tokenizer, max_length=128, doc_stride=32,
                                               max_query_length=16)
    starts, ends = _gold_logits(eval_features, _gold_token_spans(path_examples, docs))
    assert predict_answers(path_examples, eval_features, docs, starts, ends)["long"].text == "富士山"
    dropped, _, drop_report = build_qa_features(path_examples, tokenizer, max_length=128, doc_stride=32,
                                                max_query_length=16, training=True, windows_without_answer="drop")
    assert len(dropped) == len(labelled) and drop_report.windows_dropped == len(features) - len(labelled)


def test_a_token_span_maps_to_characters_from_the_document_tokens_alone():
    from bigbird_ja.qa.features import DocumentTokens

    doc = DocumentTokens(ids=[5, 6, 7], offsets=[(0, 2), (2, 4), (5, 6)], ends=[2, 5, 6])
    assert doc.span_text(1, 2) == (2, 6) and doc.span_text(0, 0) == (0, 2)


def test_a_question_whose_answer_fits_in_no_window_is_reported_and_trains_only_on_cls(tokenizer):
    context = "あ" * 10 + "とても長い答えの文字列" * 20 + "。"
    answer = "とても長い答えの文字列" * 20
    examples, _ = build_qa_examples([_sq("huge", context, answer, 10)])
    features, _, report = build_qa_features(examples, tokenizer, max_length=48, doc_stride=8, max_query_length=8,
                                            training=True)
    assert report.answer_in_no_window == ["huge"] and "answer is in no window: 1 (huge)" in report.summary()
    assert features and all(f.start_position == f.end_position == 0 for f in features)


def test_a_long_question_is_cut_to_max_query_length_and_reported(tokenizer):
    examples, _ = build_qa_examples([_sq("q", "東京は首都。", "東京", 0, question="とても長い質問" * 30)])
    features, _, report = build_qa_features(examples, tokenizer, max_length=64, doc_stride=8, max_query_length=16)
    assert report.truncated_questions == ["q"] and features[0].context_start == 1 + 16 + 1


def _sq(qid: str, context: str, answer: str, start: int, question: str = "質問?"):
    from bigbird_ja.finetune.jglue import SquadArticle, SquadParagraph, SquadQuestion

    return SquadArticle(title=qid, paragraphs=[SquadParagraph(context=context, questions=[
        SquadQuestion(id=qid, question=question, answers=[{"text": answer, "answer_start": start}])])])


def test_readers_name_the_file_line_and_field_of_a_bad_row(tmp_path):
    path = tmp_path / "jnli.json"
    path.write_text('{"sentence_pair_id": "0", "sentence1": "a", "sentence2": "b", "label": "entailment"}\n'
                    '{"sentence_pair_id": "1", "sentence1": "a", "sentence2": "b", "label": "maybe"}\n',
                    encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"jnli.json:2: label 'maybe' is not one of"):
        read_jnli(path)
    path.write_text('{"sentence_pair_id": "0", "sentence1": "a", "label": "entailment"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"jnli.json:1: missing field 'sentence2'"):
        read_jnli(path)


def test_marc_ja_reader_reads_binary_sentiment_rows(tmp_path):
    path = tmp_path / "marc.json"
    path.write_text('{"sentence": "最高の商品です。", "label": "positive", "review_id": "R1"}\n'
                    '{"sentence": "二度と買わない。", "label": "negative", "review_id": "R2"}\n', encoding="utf-8")
    rows = read_marc_ja(path)
    assert [(r.id, r.text_a, r.text_b, r.label) for r in rows] == [
        ("R1", "最高の商品です。", None, 0), ("R2", "二度と買わない。", None, 1)]


def test_jglue_readers_read_the_shared_files():
    jnli = read_jnli(JNLI / "valid-v1.3.json")
    jsts = read_jsts(JSTS / "valid-v1.3.json")
    jcqa = read_jcommonsenseqa(JCQA / "valid-v1.3.json")
    assert (len(jnli), len(jsts), len(jcqa)) == (2434, 1457, 1119)
    assert {r.label for r in jnli} == {0, 1, 2}
    assert all(0.0 <= r.label <= 5.0 for r in jsts)
    assert all(len(r.choices) == 5 and r.label in range(5) for r in jcqa)


# ----------------------------------------------------------------------------------------------------------------
# Configs and the loop


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_finetune_preset_loads_strictly(preset):
    config = load_finetune_config(preset)
    assert isinstance(config, FinetuneConfig)
    assert preset.read_text(encoding="utf-8").startswith("#")  # a header says what it is for and on what hardware
    assert preset.stem.startswith(config.task)


def test_the_task_registry_is_the_one_list_of_tasks(monkeypatch):
    from bigbird_ja.finetune import tasks

    # a task added to the registry is a task everywhere: the config, get_task and the command line
    fake = tasks.QATask("fake-qa")
    monkeypatch.setitem(tasks.TASKS, "fake-qa", fake)
    assert load_finetune_config(None, {"task": "fake-qa"}).task == "fake-qa"
    assert tasks.get_task("fake-qa") is fake
    seen = _capture_finetune(monkeypatch)
    assert cli.main(["finetune", "fake-qa"]) == 0 and seen["task"] == "fake-qa"
    parser = cli.build_parser()
    for command in ("finetune", "evaluate"):
        (task_argument,) = [a for a in parser.subcommands[command]._actions if a.dest == "task"]
        assert list(task_argument.choices) == list(tasks.TASKS)
    monkeypatch.delitem(tasks.TASKS, "fake-qa")
    assert all(f"| {name} |" in tasks.__doc__ for name in tasks.TASKS)  # each task has a row in the table
    with pytest.raises(ConfigError, match=r"task='fake-qa' is not a fine-tuning task; the tasks are \['jsquad', "):
        load_finetune_config(None, {"task": "fake-qa"})
    with pytest.raises(SystemExit):
        cli.main(["finetune", "fake-qa"])


def _documented_fields(section) -> list[str]:
    """The field names a section's docstring documents: entries `name: ...`, `a, b: ...` or `a / b: ...` at the
    left margin (continuation lines are indented), as in the pretraining sections."""
    names = []
    for line in inspect.cleandoc(section.__doc__).splitlines()[1:]:
        entry = re.match(r"(\w+(?:(?:, | / )\w+)*): ", line)
        if entry:
            names += re.split(r", | / ", entry.group(1))
    return names


def _finetune_sections() -> list[type]:
    from bigbird_ja.finetune import config

    return [c for c in vars(config).values() if dataclasses.is_dataclass(c) and c.__module__ == config.__name__]


@pytest.mark.parametrize("section", _finetune_sections(), ids=lambda c: c.__name__)
def test_every_field_of_every_finetune_section_is_documented_in_its_docstring(section):
    fields = [f.name for f in dataclasses.fields(section)]
    documented = _documented_fields(section)
    assert [f for f in fields if f not in documented] == [], f"add a `name: meaning` line to {section.__name__}"
    assert [d for d in documented if d not in fields] == [], "an entry documents no field (renamed or removed?)"
    assert len(documented) == len(set(documented))


def test_unknown_keys_and_wrong_types_are_rejected_with_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\]; valid keys are \['epochs'"):
        load_finetune_config(None, ["--train.epoch=3"])
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        load_finetune_config(None, ["--train.batch_size=big"])
    config = load_finetune_config(REPO / "configs" / "finetune" / "jnli.yaml", ["--train.lr=1e-4",
                                                                                "--data.max_length=64"])
    assert (config.train.lr, config.data.max_length, config.train.epochs) == (1e-4, 64, 4)


def test_a_preset_for_another_task_is_refused():
    with pytest.raises(ConfigError, match="is for task 'jnli', not 'jsts'"):
        finetune("jsts", REPO / "configs" / "finetune" / "jnli.yaml")


@pytest.mark.parametrize("grouping", ["none", "random", "shortest_first"])
def test_batch_order_covers_every_example_once_per_epoch(grouping):
    import torch

    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    batches = batch_order(lengths, 3, grouping, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(10))
    if grouping != "none":
        assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 2 for b in batches)
    if grouping == "shortest_first":
        assert [max(lengths[i] for i in b) for b in batches] == [3, 6, 9, 10]
    again = batch_order(lengths, 3, grouping, torch.Generator().manual_seed(0))
    assert batches == again  # a function of the seed


# ----------------------------------------------------------------------------------------------------------------
# End-to-end runs on small slices (tiny random models: plumbing, files and determinism, not accuracy)


def test_jsquad_finetune_on_some_articles_evaluates_on_others_and_writes_metrics_and_predictions(
        jsquad_raw, tokenizer_dir, tmp_path):
    # Long documents of small articles: train on 7 (144 questions), evaluate on 2 others (101 questions, ~1,500
    # tokens each: several 384-token windows per question).
    train_articles = [jsquad_raw[i] for i in (3, 8, 11, 12, 14, 16, 19)]
    valid_articles = [jsquad_raw[i] for i in (17, 18)]
    train = _squad_subset(train_articles, tmp_path / "train.json")
    valid = _squad_subset(valid_articles, tmp_path / "valid.json")
    valid_ids = {qa["id"] for a in valid_articles for p in a["paragraphs"] for qa in p["qas"]}
    started = time.perf_counter()
    result = finetune("jsquad", None, overrides=TINY_MODEL + [
        f"--model.tokenizer={tokenizer_dir}", "--data.max_length=384", "--data.doc_stride=96",
        "--data.max_query_length=64", "--train.max_steps=12", "--eval.batch_size=16"],
        train=str(train), valid=str(valid), output=str(tmp_path / "run"))
    seconds = time.perf_counter() - started
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    predictions = json.loads((tmp_path / "run" / "predictions.json").read_text(encoding="utf-8"))
    print(f"\njsquad slice: {metrics['exact_match']:.2f} EM / {metrics['f1']:.2f} F1 on {metrics['total']} "
          f"questions, {metrics['train']['steps']} steps, {seconds:.1f} s")
    assert set(predictions) == valid_ids and metrics["total"] == len(valid_ids)
    assert 0 <= metrics["exact_match"] <= metrics["f1"] <= 100
    assert metrics["train"]["steps"] == 12 and math.isfinite(metrics["train"]["final_loss"])
    assert all(isinstance(v, str) for v in predictions.values())
    contexts = {qa["id"]: "\n".join(p["context"] for p in a["paragraphs"]) for a in valid_articles
                for p in a["paragraphs"] for qa in p["qas"]}
    assert all(text in contexts[qid] for qid, text in predictions.items())  # spans of the original documents
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12
    assert load_finetune_config(tmp_path / "run" / "config.yaml").data.max_length == 384  # resolved config saved
    assert "windows" in (tmp_path / "run" / "data_report.txt").read_text(encoding="utf-8")
    # the saved model and tokenizer evaluate to the same numbers, and so does the predictions file alone
    again = evaluate_model("jsquad", result.files["model"], valid)  # with the run's saved config.yaml
    assert again["exact_match"] == pytest.approx(metrics["exact_match"])
    alone, check = evaluate_predictions("jsquad", tmp_path / "run" / "predictions.json", valid)
    assert alone == {k: metrics[k] for k in ("exact_match", "f1", "total")} and not check.missing


def test_a_non_empty_output_folder_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep")
    with pytest.raises(ValueError, match="is not empty"):
        finetune("jnli", None, overrides=TINY_MODEL, train=str(JNLI / "test-v1.3.json"),
                 valid=str(JNLI / "valid-v1.3.json"), output=str(tmp_path / "run"))


@pytest.mark.parametrize("task,train,valid,metric", [
    ("jnli", JNLI / "test-v1.3.json", JNLI / "valid-v1.3.json", "accuracy"),  # no JNLI train set here
    ("jsts", JSTS / "train-v1.3.json", JSTS / "valid-v1.3.json", "pearson"),
    ("jcommonsenseqa", JCQA / "train-v1.3.json", JCQA / "valid-v1.3.json", "accuracy"),
])
def test_classification_tasks_finetune_on_a_slice_and_write_metrics_and_predictions(
        task, train, valid, metric, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / task
    started = time.perf_counter()
    code = cli.main(["finetune", task, "--config", str(REPO / "configs" / "finetune" / f"{task}.yaml"),
                     "--train-file", str(train), "--valid-file", str(valid), "--out", str(out), *TINY_MODEL,
                     f"--model.tokenizer={tokenizer_dir}", "--data.max_length=64", "--data.max_train_examples=256",
                     "--data.max_valid_examples=128", "--train.max_steps=16", "--train.batch_size=16"])
    seconds = time.perf_counter() - started
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    predictions = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    print(f"\n{task} slice: {json.dumps({k: v for k, v in metrics.items() if k != 'train'})}, {seconds:.1f} s")
    assert metrics["total"] == len(predictions) == 128 and math.isfinite(metrics[metric])
    assert metrics["train"]["steps"] == 16
    values = list(predictions.values())
    if task == "jnli":
        assert set(values) <= {"entailment", "contradiction", "neutral"}
    elif task == "jsts":
        assert all(isinstance(v, float) for v in values) and "spearman" in metrics
    else:
        assert set(values) <= set(range(5))
    alone, check = evaluate_predictions(task, out / "predictions.json", valid)
    assert check.missing and not check.unknown  # 128 of the file's examples were predicted
    # the saved model, run again through `bigbird-ja evaluate --model` (the run's config.yaml gives the slice)
    assert cli.main(["evaluate", task, "--model", str(out / "model"), "--data", str(valid),
                     "--metrics-out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text(encoding="utf-8"))
    assert again[metric] == pytest.approx(metrics[metric], abs=1e-6) and again["total"] == 128
    rescored, _ = evaluate_predictions(task, {k: v for k, v in predictions.items()}, valid)
    assert rescored["total"] == alone["total"] > 128


# ----------------------------------------------------------------------------------------------------------------
# The generated long-range task


def test_longrange_generator_puts_every_fact_beyond_the_truncation_point(tmp_path):
    from bigbird_ja.finetune.config import SyntheticSection
    from bigbird_ja.finetune.longrange import generate_longrange, question_tokens

    spec = SyntheticSection(num_train=40, num_valid=20, seq_len=1024, num_keys=4, num_facts=2, short_fraction=0.5,
                            short_seq_len=128, question_repeats=28, min_answer_position=512, seed=3)
    paths = generate_longrange(spec, tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    assert len(tok) == 5 + spec.num_filler_words + spec.num_keys + spec.num_values + 1
    for name, n_short in (("train", 20), ("valid", 0)):
        articles = json.loads(paths[name].read_text(encoding="utf-8"))["data"]
        assert len(articles) == (40 if name == "train" else 20)
        for i, article in enumerate(articles):
            context = article["paragraphs"][0]["context"]
            qa = article["paragraphs"][0]["qas"][0]
            answer = qa["answers"][0]
            assert context[answer["answer_start"]:][:len(answer["text"])] == answer["text"]
            words = context.split(" ")
            seq_len = len(words) + question_tokens(spec) + 1
            assert seq_len == (128 if i < n_short else 1024)
            assert qa["question"] == " ".join([words[context[:answer["answer_start"]].count(" ") - 1]] * 28 + ["?"])
            keys = [j for j, w in enumerate(words) if w.startswith("k")]
            assert len(keys) == 2 and len({words[j] for j in keys}) == 2  # two facts, distinct keys
            if i >= n_short:
                assert min(keys) + question_tokens(spec) >= 512  # nothing of any fact in the first 512 tokens
            enc = tok(qa["question"], context)
            assert len(enc["input_ids"]) == seq_len and tok.unk_token_id not in enc["input_ids"]


@pytest.mark.slow
def test_longrange_task_is_solved_sparse_at_1024_tokens_and_stays_at_chance_truncated_to_512(tmp_path):
    """configs/finetune/longrange-1024.yaml: a tiny block-sparse model trained from scratch (~4 minutes on 2 cores)
    finds the value of the asked key >= 512 tokens after the question; the same model fed the first 512 tokens
    cannot (it never sees a fact; chance would be 1 / num_values if it could guess a value at all)."""
    import bigbird_ja

    preset = REPO / "configs" / "finetune" / "longrange-1024.yaml"
    started = time.perf_counter()
    result = finetune("longrange", preset, overrides=[
        f"--model.preset={REPO / 'configs' / 'model' / 'tiny-cpu.yaml'}", "--train.progress_bar=false",
        "--output.save_model=false"], output=str(tmp_path / "run"))
    seconds = time.perf_counter() - started
    metrics, config = result.metrics, load_finetune_config(preset)
    truncated = metrics["truncated_512"]
    chance = 100 / config.synthetic.num_values
    ignoring_the_question = 100 / config.synthetic.num_facts
    print(f"\nlong-range 1,024: sparse EM {metrics['exact_match']:.1f} / F1 {metrics['f1']:.1f}; truncated to 512: "
          f"EM {truncated['exact_match']:.1f} / F1 {truncated['f1']:.1f} (value chance {chance:.1f}, a model "
          f"ignoring the question ~{ignoring_the_question:.0f}); {metrics['train']['steps']} steps, {seconds:.0f} s")
    model_config = bigbird_ja.BigBirdJaConfig(**{**config.model.overrides, "vocab_size": 100})
    density = bigbird_ja.attention_mask(model_config, 1024).float().mean().item()
    assert model_config.attention_type == "block_sparse" and density < 0.2  # each query sees 5 of 32 blocks
    assert metrics["total"] == truncated["total"] == config.synthetic.num_valid
    assert metrics["exact_match"] >= 90.0
    assert truncated["exact_match"] <= chance


# ----------------------------------------------------------------------------------------------------------------
# The README's main job, QA half: a pretrained (here: random) 256-token checkpoint fine-tuned at 1,024 tokens


def _short_checkpoint(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A MaskedLM checkpoint shaped like `bigbird-ja export runs/tiny-cpu`: tiny-cpu.yaml with 256 positions."""
    import torch
    from transformers import AutoTokenizer

    import bigbird_ja
    from bigbird_ja.configuration import build_model_config

    from conftest import randomize_

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = build_model_config(REPO / "configs" / "model" / "tiny-cpu.yaml")
    config.vocab_size, config.max_position_embeddings = len(tok), 256
    torch.manual_seed(seed)
    model = randomize_(bigbird_ja.BigBirdJaForMaskedLM(config), seed)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_a_relative_position_checkpoint_reads_longer_inputs_with_its_buckets_pinned(tokenizer_dir, tmp_path):
    """Raising max_position_embeddings at fine-tune time changes nothing for lengths the checkpoint knew."""
    import torch

    from bigbird_ja.finetune.run import load_model
    from bigbird_ja.finetune.tasks import get_task

    folder = _short_checkpoint(tokenizer_dir, tmp_path / "ckpt", seed=3)
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    original = AutoModelForMaskedLM.from_pretrained(str(folder)).eval()
    cfg = load_finetune_config(None, [f"--model.init_from={folder}", "--model.overrides.max_position_embeddings=1024",
                                      "--data.max_length=1024"])
    longer = load_model(cfg, get_task("jsquad"), tok, verbose=False).eval()
    assert longer.config.max_position_embeddings == 1024 and longer.config.max_relative_positions == 256
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(tok), (2, 203), generator=gen)  # not a multiple of the block size
    mask = torch.ones_like(ids)
    mask[1, 150:] = 0
    with torch.no_grad():
        a = original.bigbird_ja(ids, attention_mask=mask).last_hidden_state
        b = longer.bigbird_ja(ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        long_ids = torch.randint(5, len(tok), (1, 1000), generator=gen)
        assert torch.isfinite(longer(long_ids).start_logits).all()
    unpinned = load_finetune_config(None, [f"--model.init_from={folder}", "--data.max_length=1024",
                                           "--model.overrides.max_position_embeddings=1024",
                                           "--model.overrides.max_relative_positions=-1"])
    assert load_model(unpinned, get_task("jsquad"), tok, verbose=False).config.max_relative_positions == -1


def test_article_slices_select_disjoint_articles_and_are_checked():
    from bigbird_ja.finetune.config import parse_slice
    from bigbird_ja.finetune.tasks import get_task

    assert parse_slice("1::2", "x") == slice(1, None, 2) and parse_slice("5", "x") == slice(None, 5)
    for bad in ("a:b", "1:2:3:4", "::0"):
        with pytest.raises(ConfigError, match="data.valid_articles"):
            load_finetune_config(None, [f"--data.valid_articles={bad}"])
    data = load_finetune_config(None, ["--data.train_articles=1::2", "--data.valid_articles=0::20"]).data
    task = get_task("jsquad")
    train, train_note = task.examples(str(JSQUAD), data, articles=data.train_articles)
    valid, valid_note = task.examples(str(JSQUAD), data, articles=data.valid_articles)
    assert "29 of 59" in train_note and "3 of 59" in valid_note
    assert not {e.document_id for e in train} & {e.document_id for e in valid}
    with pytest.raises(ValueError, match="selects none"):
        task.examples(str(JSQUAD), data, articles="100:")
    with pytest.raises(ValueError, match="max_train_examples"):
        get_task("jnli").prepare(str(JNLI / "valid-v1.3.json"), None, data, training=True)


def test_main_job_qa_preset_finetunes_an_exported_checkpoint_on_long_documents(tokenizer_dir, tmp_path):
    """configs/finetune/jsquad-tiny-cpu.yaml as the README runs it, with fewer steps and one small evaluation article."""
    preset = REPO / "configs" / "finetune" / "jsquad-tiny-cpu.yaml"
    config = load_finetune_config(preset)
    assert Path(config.data.train).name == "valid-v1.3.json"  # relative to the repository root, where it runs
    folder = _short_checkpoint(tokenizer_dir, tmp_path / "export")
    result = finetune("jsquad", preset, overrides=[
        f"--data.train={JSQUAD}", f"--data.valid={JSQUAD}", "--data.valid_articles=3:4",
        "--data.max_train_examples=64", "--train.max_steps=4", "--train.progress_bar=false"],
        model=str(folder), output=str(tmp_path / "run"))
    article = json.loads(JSQUAD.read_text(encoding="utf-8"))["data"][3]
    ids = {qa["id"] for p in article["paragraphs"] for qa in p["qas"]}
    document = "\n".join(p["context"] for p in article["paragraphs"])
    assert set(result.predictions) == ids and result.metrics["total"] == len(ids)
    assert all(text in document for text in result.predictions.values())
    report = (tmp_path / "run" / "data_report.txt").read_text(encoding="utf-8")
    assert "articles [1::2]: 29 of 59" in report and "articles [3:4]: 1 of 59" in report
    assert "need more than one window" in report
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text(encoding="utf-8"))
    assert (saved["max_position_embeddings"], saved["max_relative_positions"]) == (1024, 256)


def test_slices_in_presets_and_overrides_stay_text_not_base_60_numbers(tmp_path):
    """YAML 1.1 reads 3:4 as 184; the project's loader keeps it as written (and numbers still parse)."""
    preset = tmp_path / "jsquad-x.yaml"
    preset.write_text("task: jsquad\ndata:\n  train_articles: 1:30\n  max_length: 1_024\ntrain:\n  lr: 1e-4\n",
                      encoding="utf-8")
    config = load_finetune_config(preset, ["--data.valid_articles=3:4"])
    assert (config.data.train_articles, config.data.valid_articles) == ("1:30", "3:4")
    assert (config.data.max_length, config.train.lr) == (1024, 1e-4)


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed (optional): two processes under DeepSpeed's launcher against one plain process, same global batch


@pytest.mark.slow
@pytest.mark.distributed
def test_two_deepspeed_processes_train_and_predict_as_one_plain_process_with_the_same_global_batch(
        tokenizer_dir, tmp_path):
    import subprocess

    from conftest import cli_command, subprocess_env

    common = ["finetune", "jnli", "--train-file", str(JNLI / "test-v1.3.json"),
              "--valid-file", str(JNLI / "valid-v1.3.json"),
              *TINY_MODEL, f"--model.tokenizer={tokenizer_dir}", "--model.overrides.hidden_dropout_prob=0.0",
              "--model.overrides.attention_probs_dropout_prob=0.0", "--model.overrides.pooler_dropout=0.0",
              "--data.max_length=64", "--data.max_train_examples=96", "--data.max_valid_examples=101",
              "--train.max_steps=6", "--train.batch_size=8", "--train.log_every_steps=1", "--train.num_threads=1"]
    runs = {"plain": (1, ["--train.grad_accum_steps=2"]),
            "zero2": (2, ["--train.deepspeed=true", "--train.zero_stage=2"])}
    logs, metrics = {}, {}
    for name, (nprocs, extra) in runs.items():
        out = tmp_path / name
        cmd = cli_command(nprocs, [*common, "--out", str(out), *extra])
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
        logs[name] = _read_jsonl(out / "train_log.jsonl")
        metrics[name] = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        predictions = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
        assert len(predictions) == metrics[name]["total"] == 101  # an odd count: uneven prediction shares
        assert (out / "model" / "model.safetensors").is_file()
    print("\n" + "\n".join(f"{name}: losses {[round(r['loss'], 6) for r in log]}" for name, log in logs.items()))
    assert metrics["zero2"]["train"]["world_size"] == 2 and metrics["plain"]["train"]["world_size"] == 1
    assert metrics["zero2"]["train"]["samples"] == metrics["plain"]["train"]["samples"] == 6 * 16
    assert [r["step"] for r in logs["zero2"]] == [r["step"] for r in logs["plain"]] == list(range(1, 7))
    for a, b in zip(logs["plain"], logs["zero2"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["lr"] == pytest.approx(b["lr"])
    assert logs["plain"][-1]["loss"] != logs["plain"][0]["loss"]  # it trained
    assert metrics["zero2"]["accuracy"] == pytest.approx(metrics["plain"]["accuracy"], abs=1e-9)


def test_a_multi_process_launch_without_deepspeed_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"add --train.deepspeed=true"):
        finetune("jnli", None, overrides=TINY_MODEL, train=str(JNLI / "test-v1.3.json"),
                 valid=str(JNLI / "valid-v1.3.json"), output=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="needs train.deepspeed=true"):
        load_finetune_config(None, ["--train.zero_stage=2"])
    with pytest.raises(ConfigError, match="must be 0, 1 or 2"):
        load_finetune_config(None, ["--train.deepspeed=true", "--train.zero_stage=3"])


def test_the_last_step_of_an_epoch_is_filled_from_its_first_batches(tmp_path):
    """grad_accum_steps x world micro-batches in every step, also when the epoch does not divide into them."""
    from types import SimpleNamespace

    import torch

    from bigbird_ja.finetune.classification import ClassificationCollator, EncodedExample
    from bigbird_ja.finetune.config import TrainSection
    from bigbird_ja.finetune.trainer import train_model

    seen = []

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2, 1))

        def forward(self, input_ids, attention_mask, token_type_ids, labels):
            seen.append(input_ids[:, 0].tolist())
            return SimpleNamespace(loss=((input_ids.float() @ self.weight).squeeze(1) - labels).pow(2).mean())

    data = [EncodedExample([i, 1], [0, 0], float(i)) for i in range(10)]  # 5 batches of 2
    cfg = TrainSection(epochs=1, batch_size=2, grad_accum_steps=2, lr=1e-2, warmup_ratio=0.0, device="cpu",
                       progress_bar=False, log_every_steps=1)
    summary = train_model(Toy(), data, ClassificationCollator(0, regression=True), cfg,
                          log_file=tmp_path / "log.jsonl")
    assert summary["steps"] == 3 and summary["samples"] == 3 * 2 * 2 and len(seen) == 6
    firsts = [ids for batch in seen for ids in batch]
    assert sorted(set(firsts)) == list(range(10))  # every example once ...
    assert seen[5] == seen[0]  # ... and the sixth micro-batch is the epoch's first again
    assert len(_read_jsonl(tmp_path / "log.jsonl")) == 3


def test_dropout_differs_between_ranks_and_one_process_keeps_its_seed(monkeypatch):
    """train_model seeds the global RNG (dropout) per rank; the batch order has its own generator (train.seed)."""
    import torch

    from bigbird_ja.finetune import trainer
    from bigbird_ja.finetune.config import TrainSection

    class Seeded(Exception):
        pass

    class StopAtDevice:  # stops train_model right after it seeded the global RNG
        def to(self, device):
            raise Seeded

    def global_rng_of(rank: int, world: int) -> tuple[int, list[float]]:
        # a process group that is already up (as under a launcher), seen through torch.distributed alone
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: world > 1)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
        cfg = TrainSection(seed=5, device="cpu", deepspeed=world > 1, progress_bar=False)
        with torch.random.fork_rng(devices=[]):
            with pytest.raises(Seeded):
                trainer.train_model(StopAtDevice(), [object()], None, cfg)
            return torch.initial_seed(), torch.rand(3).tolist()

    one_process = global_rng_of(0, 1)
    ranks = [global_rng_of(rank, 4) for rank in range(4)]
    assert one_process[0] == 5  # a one-process run is unchanged
    assert len({seed for seed, _ in ranks}) == len({tuple(draw) for _, draw in ranks}) == 4


def test_missing_and_broken_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": "b"', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken.json: not JSON .*expected one object mapping id"):
        evaluate_predictions("jsquad", broken, JSQUAD)
    with pytest.raises(DataFormatError, match=r"broken.json: not JSON .*SQuAD v1.1"):
        read_squad(broken)
    with pytest.raises(FileNotFoundError, match="data file .*nowhere.json does not exist"):
        read_squad(tmp_path / "nowhere.json")
    assert cli.main(["evaluate", "jsquad", "--predictions", str(tmp_path / "nowhere.json"), "--data",
                     str(JSQUAD)]) == 2
