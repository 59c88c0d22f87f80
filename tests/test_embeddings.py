"""Embeddings (bigbird_ja.embeddings): saved folders load in sentence-transformers with mean pooling, with the package
and without it (remote code); texts longer than one window are read in windows; the retrieval evaluation's metrics
and its command."""

from __future__ import annotations

import json

import pytest
import torch

import bigbird_ja
from bigbird_ja import cli
from bigbird_ja.embeddings import POOLING, embed, retrieval_metrics
from conftest import randomize_, tiny_config
from test_models import _word_tokenizer

sentence_transformers = pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers")

MAX_LENGTH = 64  # 8 blocks of 8: sparse (a query block sees 6), and texts of 200 words need 4 windows
TEXTS = ["w1 w2 w3", " ".join(f"w{i % 90 + 5}" for i in range(40)), "w7 " * 61]  # the last fills one window


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoder") / "model"
    model = randomize_(bigbird_ja.BigBirdJaModel(tiny_config(max_position_embeddings=MAX_LENGTH)), seed=3).eval()
    model.save_pretrained(str(folder))
    _word_tokenizer(model.config.vocab_size).save_pretrained(str(folder))
    return folder


def _mean_pool(model, tokenizer, text: str) -> torch.Tensor:
    """The definition: the mean of the last hidden states of [CLS] text [SEP]."""
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].mean(0)


def test_a_saved_folder_carries_mean_pooling_for_sentence_transformers(encoder_folder):
    pooling = json.loads((encoder_folder / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    assert POOLING == "mean" and pooling["pooling_mode_mean_tokens"] is True
    assert [mode for mode, on in pooling.items() if mode.startswith("pooling_mode_") and on] == \
        ["pooling_mode_mean_tokens"]
    config = json.loads((encoder_folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
    assert config["max_seq_length"] == MAX_LENGTH


def test_sentence_transformers_with_the_package_gives_embeds_vectors(encoder_folder):
    from transformers import AutoModel, AutoTokenizer

    st = sentence_transformers.SentenceTransformer(str(encoder_folder), device="cpu")
    assert st.max_seq_length == MAX_LENGTH
    got = torch.from_numpy(st.encode(TEXTS, batch_size=3))  # one padded batch
    model = AutoModel.from_pretrained(str(encoder_folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_folder))
    expected = embed(model, tokenizer, TEXTS)
    print("max |diff|", float((got - expected).abs().max()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected[1], _mean_pool(model, tokenizer, TEXTS[1]), rtol=1e-5, atol=1e-6)


REMOTE_ST = r"""
from sentence_transformers import SentenceTransformer

st = SentenceTransformer(job["folder"], device="cpu", trust_remote_code=True)
torch.save({"vectors": torch.from_numpy(st.encode(job["texts"], batch_size=3)), "length": st.max_seq_length,
            "module": type(st[0].auto_model).__module__,
            "imported": sorted(m for m in sys.modules if m.split(".")[0] in job["blocked"])}, job["results"])
"""


def test_sentence_transformers_without_the_package_gives_the_same_vectors(encoder_folder, tmp_path):
    from test_hub import BLOCKED, ISOLATION, run_child
    from transformers import AutoModel, AutoTokenizer

    results = run_child(ISOLATION + REMOTE_ST, dict(blocked=BLOCKED, folder=str(encoder_folder), texts=TEXTS),
                        tmp_path)
    assert results["module"].startswith("transformers_modules.") and results["imported"] == []
    assert results["length"] == MAX_LENGTH
    model = AutoModel.from_pretrained(str(encoder_folder)).eval()
    expected = embed(model, AutoTokenizer.from_pretrained(str(encoder_folder)), TEXTS)
    torch.testing.assert_close(results["vectors"], expected, rtol=1e-5, atol=1e-5)


def test_a_long_text_is_the_token_weighted_mean_of_its_windows(encoder_folder):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(encoder_folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_folder))
    words = [f"w{(7 * i) % 90 + 5}" for i in range(200)]  # 200 tokens: windows of 62 + 2 -> 62, 62, 62, 14
    pieces = [" ".join(words[i:i + MAX_LENGTH - 2]) for i in range(0, 200, MAX_LENGTH - 2)]
    weights = torch.tensor([len(p.split()) + 2 for p in pieces], dtype=torch.float64)
    assert weights.tolist() == [64, 64, 64, 16]
    by_window = torch.stack([_mean_pool(model, tokenizer, p).double() for p in pieces])
    expected = (by_window * weights[:, None]).sum(0) / weights.sum()
    got = embed(model, tokenizer, [" ".join(words)], batch_size=2)[0]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # truncated: the first window alone; windows of another width change the vector, never the shape
    first = embed(model, tokenizer, [" ".join(words)], truncate_to=MAX_LENGTH)[0]
    torch.testing.assert_close(first.double(), by_window[0], rtol=1e-5, atol=1e-6)
    assert embed(model, tokenizer, [" ".join(words)], max_length=32).shape == (1, model.config.hidden_size)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_length=MAX_LENGTH + 1), f"max_length={MAX_LENGTH + 1} exceeds the model's max_position_embeddings"),
    (dict(max_length=2), "max_length=2: must be an integer >= 3"),
    (dict(truncate_to=0), "truncate_to=0: must be an integer >= 3"),
])
def test_windows_longer_than_the_model_are_refused_naming_the_argument(encoder_folder, kwargs, message):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(encoder_folder))
    with pytest.raises(ValueError, match=message):
        embed(model, AutoTokenizer.from_pretrained(str(encoder_folder)), ["w1"], **kwargs)


def test_retrieval_metrics_rank_by_cosine():
    documents = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    queries = torch.tensor([[2.0, 0.1], [0.1, 3.0], [1.0, 0.0]])  # nearest: 0, 1, 0 (then 2, then 1)
    metrics = retrieval_metrics(queries, documents, relevant=[0, 1, 1], ks=(1, 2))
    # ranks 1, 1, 3
    assert metrics == pytest.approx({"recall@1": 200 / 3, "recall@2": 200 / 3, "mrr": (1 + 1 + 1 / 3) / 3 * 100})


def test_bigbird_ja_evaluate_retrieval_on_a_tiny_split(encoder_folder, tmp_path):
    def article(title: str, words: list[str], questions: list[str]) -> dict:
        return {"title": title, "paragraphs": [{"context": " ".join(words), "qas": [
            {"id": f"{title}-{i}", "question": q, "answers": [{"text": words[0], "answer_start": 0}]}
            for i, q in enumerate(questions)]}]}

    data = {"version": "v1.0", "data": [article("a", [f"w{i + 5}" for i in range(100)], ["w5 w6", "w90 w91"]),
                                         article("b", [f"w{i % 7 + 50}" for i in range(30)], ["w50 w51 w52"])]}
    (tmp_path / "valid.json").write_text(json.dumps(data), encoding="utf-8")
    argv = ["evaluate", "jsquad", "--retrieval", "--model", str(encoder_folder), "--data", str(tmp_path / "valid.json")]
    assert cli.main(argv + ["--metrics-out", str(tmp_path / "full.json")]) == 0
    assert cli.main(argv + ["--truncate-to", "16", "--metrics-out", str(tmp_path / "cut.json")]) == 0
    full = json.loads((tmp_path / "full.json").read_text(encoding="utf-8"))
    cut = json.loads((tmp_path / "cut.json").read_text(encoding="utf-8"))
    assert (full["questions"], full["documents"], full["max_length"]) == (3, 2, MAX_LENGTH)
    assert (full["document_tokens_mean"], full["windows_per_document_max"]) == (67.0, 2)
    assert (cut["document_tokens_read_mean"], cut["windows_per_document_max"]) == (16.0, 1)
    for metrics in (full, cut):
        assert 0 <= metrics["mrr"] <= 100 and metrics["recall@10"] == 100.0  # two documents: always within 10
    assert cli.main(argv + ["--predictions", str(tmp_path / "p.json")]) == 2  # one mode at a time
