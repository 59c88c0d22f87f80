"""The long-document QA pipeline (`pipeline("long-document-question-answering")`, bigbird_ja.pipelines).

Agreement, not accuracy: a tiny random QA model saved as `bigbird-ja finetune` saves one (<run>/model beside
<run>/config.yaml) answers a few JSQuAD articles through `bigbird-ja evaluate --model` and through the pipeline,
and the answers must be the same. The tokenizer and the JSQuAD subsets are test_finetune.py's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import bigbird_ja
from bigbird_ja import cli
from bigbird_ja.configuration import build_model_config
from bigbird_ja.finetune import load_finetune_config
from bigbird_ja.finetune.documents import build_qa_examples
from bigbird_ja.finetune.jglue import read_squad
from bigbird_ja.pipelines import QA_TASK
from bigbird_ja.qa.settings import QASettings, write_qa_settings
from conftest import randomize_
from test_finetune import JSQUAD, REPO, TINY_MODEL, _squad_subset, jsquad_raw, tokenizer_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not JSQUAD.is_file(), reason="JGLUE data not found beside the repository")

# Windows of 192 tokens (12 blocks of 16: sparse) over documents of up to ~600 tokens, 48 tokens of overlap.
RUN_SETTINGS = ["--data.max_length=192", "--data.doc_stride=48", "--data.max_query_length=29",
                "--eval.n_best=10", "--eval.max_answer_tokens=20", "--eval.batch_size=1"]
# RUN_SETTINGS as the pipeline's keyword arguments
SAVED_RUN_SETTINGS = dict(max_length=192, doc_stride=48, max_query_length=29, n_best=10, max_answer_tokens=20)
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
    assert data.max_length == 4096 and (data.doc_stride, data.max_query_length) == (512, 128)
    # fine-tuning's windows do not fit this 256-token model: cut to its length, stride and question in proportion
    assert (qa.qa_settings.max_length, qa.qa_settings.doc_stride, qa.qa_settings.max_query_length) == (256, 64, 64)
    assert "max_position_embeddings=256" in qa.qa_settings.source
    assert (qa.qa_settings.n_best, qa.qa_settings.max_answer_tokens) == (evaluation.n_best,
                                                                        evaluation.max_answer_tokens)
    answer = qa({"question": "質問?", "context": "本文。" * 200})  # several windows, none longer than the model
    assert set(answer) == {"answer", "start", "end", "score"}
    with pytest.raises(ValueError, match="max_length=512.*max_position_embeddings=256"):
        qa({"question": "質問?", "context": "本文。"}, max_length=512)  # asked for: refused, never cut silently
    with pytest.raises(ValueError, match="^context is empty"):
        qa({"question": "質問?", "context": ""})  # nothing to answer from


def test_a_model_of_fine_tunings_length_or_longer_keeps_fine_tunings_windows():
    from bigbird_ja.pipelines import default_qa_settings

    for length in (4096, 8192):
        assert default_qa_settings(build_model_config(None, {"max_position_embeddings": length})) == QASettings()


def test_a_saved_pipeline_loads_again_without_remote_code(qa, examples, tmp_path):
    from transformers import pipeline

    qa.save_pretrained(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text(encoding="utf-8"))
    # the folder names its own copy of the pipeline (for Pythons without the package), never the package's module
    assert config["custom_pipelines"][QA_TASK]["impl"] == "pipeline_bigbird_ja.LongDocumentQuestionAnsweringPipeline"
    assert (tmp_path / "saved" / "pipeline_bigbird_ja.py").is_file()
    assert not (tmp_path / "saved" / "pipelines.py").exists()
    again = pipeline(QA_TASK, model=str(tmp_path / "saved"), device="cpu", **SAVED_RUN_SETTINGS)
    inputs = {"question": examples[0].question, "context": examples[0].context}
    assert again(inputs) == qa(inputs)
    torch.testing.assert_close(again.model.qa_outputs.weight, qa.model.qa_outputs.weight, rtol=0, atol=0)


# Issue 30: the pipeline travels with the model. Where bigbird_ja cannot be imported (test_hub's isolation).
REMOTE_PIPELINE = r"""
from transformers import pipeline

qa = pipeline(job["task"], model=job["folder"], trust_remote_code=True, device="cpu")
answers = qa(job["inputs"])
qa.save_pretrained(job["resaved"])  # from the copy: the folder must name and hold the pipeline's code again
# the run's settings came from its config.yaml beside the model, which the new folder lacks: pass them
again = pipeline(job["task"], model=job["resaved"], trust_remote_code=True, device="cpu", **job["settings"])
torch.save({"answers": answers, "again": again(job["inputs"]), "module": type(qa).__module__,
            "settings": [qa.qa_settings.max_length, qa.qa_settings.doc_stride, qa.qa_settings.n_best],
            "imported": sorted(m for m in sys.modules if m.split(".")[0] in job["blocked"])}, job["results"])
"""


def test_the_pipeline_runs_from_the_folder_without_the_package_with_the_same_answers(qa, run_dir, examples,
                                                                                      tmp_path):
    from test_hub import BLOCKED, ISOLATION, run_child

    inputs = [{"question": e.question, "context": e.context} for e in examples[:6]]
    results = run_child(ISOLATION + REMOTE_PIPELINE, dict(blocked=BLOCKED, task=QA_TASK, folder=str(run_dir / "model"),
                                                          inputs=inputs, resaved=str(tmp_path / "resaved"),
                                                          settings=SAVED_RUN_SETTINGS), tmp_path)
    assert results["module"].startswith("transformers_modules.") and results["imported"] == []
    # the run's settings (config.yaml beside the model), read by the copy as by the package
    assert results["settings"] == [qa.qa_settings.max_length, qa.qa_settings.doc_stride, qa.qa_settings.n_best]
    expected = qa(inputs)
    print(expected[:2], results["answers"][:2])
    assert results["answers"] == expected and results["again"] == expected


# ----------------------------------------------------------------------------------------------------------------
# The QA settings travel with the model: `qa_settings` in its config.json (`bigbird_ja.qa.settings`)


def test_a_finetuned_qa_folder_carries_its_settings_to_the_pipeline_without_a_run_config(tokenizer_dir, subset,
                                                                                          examples, tmp_path):
    from transformers import pipeline

    from bigbird_ja.finetune import finetune

    # the first 8 questions: 6 about a one-window document, 2 about one of several windows
    result = finetune("jsquad", None, overrides=TINY_MODEL + RUN_SETTINGS + [
        f"--model.tokenizer={tokenizer_dir}", "--train.max_steps=2", "--data.max_train_examples=8",
        "--data.max_valid_examples=8"], train=str(subset), valid=str(subset), output=str(tmp_path / "run"),
        verbose=False)
    saved = json.loads((result.files["model"] / "config.json").read_text(encoding="utf-8"))["qa_settings"]
    assert saved == {"max_length": 192, "doc_stride": 48, "max_query_length": 29, "truncate": False, "n_best": 10,
                     "max_answer_tokens": 20, "max_answer_chars": None}
    moved = tmp_path / "elsewhere" / "model"  # the folder alone: no config.yaml beside it
    shutil.copytree(result.files["model"], moved)
    qa = pipeline(QA_TASK, model=str(moved), device="cpu")
    assert qa.qa_settings == QASettings(**saved, source=str(moved / "config.json"))
    asked = examples[:8]
    assert max(len(list(qa.preprocess({"question": e.question, "context": e.context}))) for e in asked) >= 4
    answers = qa([{"question": e.question, "context": e.context} for e in asked])
    assert {e.id: a["answer"] for e, a in zip(asked, answers)} == result.predictions  # as the run evaluated it


def test_the_models_own_settings_win_over_a_run_config_beside_it(run_dir, tmp_path):
    from transformers import pipeline

    shutil.copytree(run_dir, tmp_path / "run")
    folder = tmp_path / "run" / "model"
    model = bigbird_ja.BigBirdJaForQuestionAnswering.from_pretrained(str(folder))
    write_qa_settings(model.config, QASettings(max_length=128, doc_stride=32, max_query_length=16, n_best=5,
                                               max_answer_tokens=7))
    model.save_pretrained(str(folder))
    qa = pipeline(QA_TASK, model=str(folder), device="cpu")
    settings = qa.qa_settings
    assert (settings.max_length, settings.doc_stride, settings.max_query_length) == (128, 32, 16)
    assert (settings.n_best, settings.max_answer_tokens, settings.source) == (5, 7, str(folder / "config.json"))


@pytest.mark.parametrize("saved, message", [
    ({"max_length": 0}, r"config\.json: qa_settings\.max_length=0: must be an integer >= 1"),
    ({"doc_stride": 48, "window": 192}, r"config\.json: unknown qa_settings keys \['window'\]; valid keys are "
                                        r"\['max_length', 'doc_stride'"),
    ([192, 48], r"config\.json: qa_settings must be a mapping"),
], ids=["bad-value", "unknown-key", "not-a-mapping"])
def test_qa_settings_that_break_a_rule_are_refused_naming_the_config_file(tokenizer_dir, tmp_path, saved, message):
    from transformers import pipeline

    folder = _tiny_qa_model(tokenizer_dir, tmp_path / "model", seed=5)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "qa_settings": saved}), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        pipeline(QA_TASK, model=str(folder), device="cpu")


def test_qa_settings_survive_remote_code_loading_and_saving_where_bigbird_ja_cannot_be_imported(tmp_path):
    from test_hub import BLOCKED, ISOLATION, run_child

    config = build_model_config(REPO / "configs" / "model" / "tiny-cpu.yaml")
    settings = QASettings(max_length=192, doc_stride=48, max_query_length=29, n_best=10, max_answer_tokens=20)
    write_qa_settings(config, settings)
    config.save_pretrained(str(tmp_path / "model"))
    results = run_child(ISOLATION + r"""
config = transformers.AutoConfig.from_pretrained(job["folder"], trust_remote_code=True)
config.save_pretrained(job["resaved"])
again = transformers.AutoConfig.from_pretrained(job["resaved"], trust_remote_code=True)
torch.save({"module": type(config).__module__, "loaded": config.qa_settings, "resaved": again.qa_settings},
           job["results"])
""", dict(blocked=BLOCKED, folder=str(tmp_path / "model"), resaved=str(tmp_path / "resaved")), tmp_path)
    assert results["module"].startswith("transformers_modules.")
    assert results["loaded"] == results["resaved"] == settings.to_saved()


# ----------------------------------------------------------------------------------------------------------------
# Issue 25, case 4: damaged models, inputs that mean nothing, answers bounded in characters

# Short windows (8 blocks of 16), so that long contexts cost little: what the bounds tests and the properties use.
SHORT_WINDOWS = dict(max_length=128, doc_stride=32, max_query_length=32)


@pytest.fixture(scope="module")
def bare_qa(tokenizer_dir, tmp_path_factory):
    """A pipeline over a model folder without a run config (fine-tuning's span defaults: max_answer_tokens=30)."""
    from transformers import pipeline

    folder = _tiny_qa_model(tokenizer_dir, tmp_path_factory.mktemp("bare-qa") / "model", seed=2)
    return pipeline(QA_TASK, model=str(folder), device="cpu", **SHORT_WINDOWS)


def _damage(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of a file: bit flips that keep its size."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_model_folder_is_refused_before_it_answers_naming_the_file(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, pipeline

    from bigbird_ja.common.checksums import DamagedFolderError, save_model_folder

    built = _tiny_qa_model(tokenizer_dir, tmp_path / "built", seed=3)
    model = bigbird_ja.BigBirdJaForQuestionAnswering.from_pretrained(str(built))
    save_model_folder(model, AutoTokenizer.from_pretrained(str(built)), tmp_path / "model")  # as export writes it
    _damage(tmp_path / "model" / "model.safetensors")
    with pytest.raises(DamagedFolderError, match=r"model folder .*model is damaged: model.safetensors has sha256") as err:
        qa = pipeline(QA_TASK, model=str(tmp_path / "model"), device="cpu", **SHORT_WINDOWS)
        print("answered:", qa({"question": "東京はどこ?", "context": "東京は日本の首都である。"}))
    # the message itself, not transformers' "Could not load model ... See the original errors" with traceback text
    assert "Could not load model" not in str(err.value) and "Traceback" not in str(err.value)


def test_non_finite_logits_are_an_error_naming_the_model_folder_never_an_answer(tokenizer_dir, tmp_path):
    """A folder without checksums.json (another tool's, or weights that diverged in training) is loaded as it is;
    its NaN logits are caught before they rank anything."""
    from transformers import pipeline

    folder = _tiny_qa_model(tokenizer_dir, tmp_path / "model", seed=4)
    model = bigbird_ja.BigBirdJaForQuestionAnswering.from_pretrained(str(folder))
    with torch.no_grad():
        model.bigbird_ja.encoder.layer[0].output.dense.weight[3, 5] = math.nan
    model.save_pretrained(str(folder))
    qa = pipeline(QA_TASK, model=str(folder), device="cpu", **SHORT_WINDOWS)
    with pytest.raises(ValueError, match=rf"{folder}.*non-finite.*(damaged|diverged)"):
        print("answered:", qa({"question": "東京はどこ?", "context": "東京は日本の首都である。"}))


@pytest.mark.parametrize("question, context, argument", [
    ("", "東京は日本の首都である。", "question"),
    (" \u3000\n\t", "東京は日本の首都である。", "question"),
    ("\x00\x07", "東京は日本の首都である。", "question"),
    ("東京はどこ?", "", "context"),
    ("東京はどこ?", " \n\u3000 ", "context"),
    ("東京\ud800はどこ?", "東京は日本の首都である。", "question"),
    ("東京はどこ?", "東京は日本の\udfff首都である。", "context"),
], ids=["empty-question", "blank-question", "control-question", "empty-context", "blank-context",
        "surrogate-question", "surrogate-context"])
def test_inputs_that_mean_nothing_are_refused_naming_the_argument(bare_qa, question, context, argument):
    with pytest.raises(ValueError, match=rf"^{argument} "):
        print("answered:", bare_qa({"question": question, "context": context}))
    with pytest.raises(ValueError, match=rf"^{argument} "):
        bare_qa(question=[question], context=[context])


def test_byte_pieces_get_the_span_of_their_own_character():
    """Byte fallback turns a run of characters outside the vocabulary into one piece per byte, and `tokenizers`
    gives every one of them the span of the whole run; each byte piece is given its own character's span."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from bigbird_ja.qa.features import tokenize_document

    vocab = [("[UNK]", 0.0), ("a", -1.0), ("b", -1.0)] + [(f"<0x{i:02X}>", -10.0) for i in range(256)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.NFKC()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    context = "a😀\x01é\U0001F389b"
    doc = tokenize_document(tokenizer, context)
    expected = [(0, 1)] + [(1, 2)] * 4 + [(2, 3)] + [(3, 4)] * 2 + [(4, 5)] * 4 + [(5, 6)]
    assert [tuple(span) for span in backend.encode(context).offsets][1:3] == [(1, 5), (1, 5)]  # the whole run
    assert doc.offsets == expected
    assert doc.ends == [end for _, end in expected]
    # where NFKC changed the run ("ｶ" -> "カ") its bytes are not the original's: the run's span is kept
    assert tokenize_document(tokenizer, "aｶ😀b").offsets == [(0, 1)] + [(1, 3)] * 7 + [(3, 4)]


@pytest.mark.parametrize("run", ["😀", "\x01\x02", "🎉\u200d"], ids=["emoji", "control", "emoji-zwj"])
def test_answers_are_bounded_in_characters_over_runs_of_byte_pieces(bare_qa, run):
    context = "本文は東京にある。" + run * 300 + "終わり。"
    inputs = {"question": "東京はどこ?", "context": context}
    default_limit = 8 * bare_qa.qa_settings.max_answer_tokens  # the documented default: 8 characters a token
    for limit, given in ((default_limit, {}), (7, {"max_answer_chars": 7})):
        answers = bare_qa(inputs, top_k=5, **given)
        print([(a["start"], a["end"], round(a["score"], 3)) for a in answers])
        assert answers
        for answer in answers:
            assert 0 < len(answer["answer"]) <= limit
            assert context[answer["start"]:answer["end"]] == answer["answer"]
            assert math.isfinite(answer["score"])
    assert bare_qa.qa_settings.answer_char_limit == default_limit == 240
    with pytest.raises(ValueError, match="max_answer_chars=0"):
        bare_qa(inputs, max_answer_chars=0)


# Property: whatever the question and context, a call answers within the bounds or refuses naming the argument.
_JAPANESE = st.characters(min_codepoint=0x3041, max_codepoint=0x30FF) | st.characters(min_codepoint=0x4E00,
                                                                                      max_codepoint=0x6FFF)
_EMOJI = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF) | st.sampled_from("\u200d\ufe0f")
_CONTROL = st.characters(categories=["Cc", "Cf"])
_WHITESPACE = st.sampled_from(" \t\n\r\u3000\u00a0\u2028\x0b\x0c")
_HALF_WIDTH = st.characters(min_codepoint=0xFF61, max_codepoint=0xFF9F)  # NFKC composes ｶﾞ into ガ
_ANY = st.characters(codec="utf-8")
_SURROGATE = st.characters(categories=["Cs"])


@st.composite
def _texts(draw, min_segments: int, max_segments: int, with_surrogates: bool) -> str:
    """Text made of segments: short mixed strings and long runs of one character (emoji, control characters,
    whitespace: what byte fallback and NFKC make hard); with_surrogates: a lone surrogate put somewhere in it."""
    alphabet = _JAPANESE | _EMOJI | _CONTROL | _WHITESPACE | _HALF_WIDTH | _ANY
    runs = st.builds(lambda char, n: char * n, _EMOJI | _CONTROL | _WHITESPACE | _JAPANESE, st.integers(1, 80))
    text = "".join(draw(st.lists(st.text(alphabet, min_size=1, max_size=24) | runs, min_size=min_segments,
                                 max_size=max_segments)))
    if with_surrogates:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_SURROGATE) + text[at:]
    return text


def _token_count(doc, start: int, end: int) -> int | None:
    """The fewest document tokens whose span is [start, end) (bytes of one character share its span), or None."""
    firsts = [i for i, (s, _) in enumerate(doc.offsets) if s == start]
    if not firsts:
        return None
    lasts = [j for j in range(firsts[-1], len(doc.ids)) if doc.ends[j] == end]
    return lasts[0] - firsts[-1] + 1 if lasts else None


@pytest.mark.slow
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                 HealthCheck.data_too_large])
@given(data=st.data(), with_surrogates=st.booleans(), top_k=st.integers(1, 3),
       max_answer_tokens=st.sampled_from([None, 1, 4, 30]), max_answer_chars=st.sampled_from([None, 1, 5, 40]))
def test_every_question_and_context_is_answered_within_bounds_or_refused_naming_the_argument(
        bare_qa, data, with_surrogates, top_k, max_answer_tokens, max_answer_chars):
    from bigbird_ja.qa.features import tokenize_document

    question = data.draw(_texts(1, 3, with_surrogates and data.draw(st.booleans())), label="question")
    context = data.draw(_texts(1, 6, with_surrogates), label="context")
    given_settings = {k: v for k, v in dict(max_answer_tokens=max_answer_tokens,
                                            max_answer_chars=max_answer_chars).items() if v is not None}
    bounds = dataclasses.replace(bare_qa.qa_settings, **given_settings)
    try:
        answers = bare_qa({"question": question, "context": context}, top_k=top_k, **given_settings)
    except ValueError as err:
        argument = str(err).split(" ", 1)[0]
        assert argument in ("question", "context"), str(err)
        text = question if argument == "question" else context
        if "surrogate" in str(err):  # and never a refusal of text that holds something
            assert any(0xD800 <= ord(c) <= 0xDFFF for c in text), str(err)
        else:
            assert all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text), str(err)
        event(f"refused: {argument} " + ("(lone surrogate)" if "surrogate" in str(err) else "(nothing in it)"))
        return
    answers = [answers] if top_k == 1 else answers
    assert 1 <= len(answers) <= top_k
    if answers == [{"answer": "", "start": 0, "end": 0, "score": -math.inf}]:
        event("no span")  # no candidate within the bounds among the n_best starts and ends: documented
        return
    doc = tokenize_document(bare_qa.tokenizer, context)
    for answer in answers:
        assert context[answer["start"]:answer["end"]] == answer["answer"] != ""
        assert len(answer["answer"]) <= bounds.answer_char_limit
        tokens = _token_count(doc, answer["start"], answer["end"])
        assert tokens is not None and tokens <= bounds.max_answer_tokens, (answer, tokens)
        assert math.isfinite(answer["score"])
    event("answered")
