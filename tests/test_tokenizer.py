"""The Japanese tokenizer: trained on JGLUE text, checked on held-out JGLUE text and on hostile input.

One tokenizer is trained per session (vocabulary 8,000; a few seconds) on the JSQuAD paragraphs of half of the
articles plus JSTS train, JNLI test and JCommonsenseQA train sentences. Everything it is judged on is held out:
the other half of the JSQuAD articles (paragraphs and questions) and JSTS valid, JNLI valid and JCommonsenseQA
valid sentences.
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from bigbird_ja import cli, tokenization
from bigbird_ja.finetune.answer_coverage import answer_boundary_rate
from bigbird_ja.tokenization import SPECIAL_TOKENS, VocabSizeError, train_tokenizer

JGLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "jglue"
JSQUAD = JGLUE / "jsquad-v1.3" / "valid-v1.3.json"
VOCAB_SIZE = 8000

pytestmark = pytest.mark.skipif(not JSQUAD.is_file(), reason=f"JGLUE data not found at {JGLUE} (shared/ is laid "
                                                              f"beside the repository)")

# Inputs chosen to break tokenizers: emoji (with ZWJ and variation selectors), rare and astral kanji, control
# characters, width variants that NFKC rewrites (one character into two, two into one), decomposed accents, runs of
# spaces, a literal that spells a byte piece, private-use characters.
HOSTILE = [
    "😀👨‍👩‍👧❤️🇯🇵",
    "𠮷野家で鱻と龘と𪚲を食べた",
    "NUL\x00と制御\x07文字\x1fと\x7fDEL",
    "ｶﾞｷﾞｸﾞｹﾞｺﾞ ﾊﾟﾋﾟﾌﾟ",
    "㍻㍼㌔㌘①②⑩",
    "ＡＢＣ１２３　全角スペース　",
    "e\u0301te\u0301 café",
    "  先頭  と  末尾  ",
    "<0x41> と <0xE3> は文字列",
    "\ue000\uf8ff私用領域",
    "\t タブ\tと改行\nと\r復帰",
    "[CLS]や[MASK]の文字列",
]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sentences(path: Path, keys: list[str]) -> list[str]:
    return [row[key] for row in _read_jsonl(path) for key in keys]


def _paragraph(context: str) -> str:
    return context.split(" [SEP] ", 1)[1] if " [SEP] " in context else context


CHOICES = ["question"] + [f"choice{i}" for i in range(5)]


@pytest.fixture(scope="session")
def jglue():
    """Train/held-out split of the JGLUE files (articles split by position: even ones train, odd ones held out)."""
    articles = json.loads(JSQUAD.read_text(encoding="utf-8"))["data"]
    train_articles = articles[0::2]
    heldout_articles = articles[1::2]
    train_lines = []
    for article in train_articles:
        train_lines.append(article["title"])
        train_lines += [_paragraph(p["context"]) for p in article["paragraphs"]]
    train_lines += _sentences(JGLUE / "jsts-v1.3" / "train-v1.3.json", ["sentence1", "sentence2"])
    train_lines += _sentences(JGLUE / "jnli-v1.3" / "test-v1.3.json", ["sentence1", "sentence2"])
    train_lines += _sentences(JGLUE / "jcommonsenseqa-v1.3" / "train-v1.3.json", CHOICES)
    heldout = [_paragraph(p["context"]) for a in heldout_articles for p in a["paragraphs"]]
    heldout += [qa["question"] for a in heldout_articles for p in a["paragraphs"] for qa in p["qas"]]
    heldout += _sentences(JGLUE / "jsts-v1.3" / "valid-v1.3.json", ["sentence1", "sentence2"])
    heldout += _sentences(JGLUE / "jnli-v1.3" / "valid-v1.3.json", ["sentence1", "sentence2"])
    heldout += _sentences(JGLUE / "jcommonsenseqa-v1.3" / "valid-v1.3.json", CHOICES)
    return {
        "train_lines": train_lines,
        "heldout": list(dict.fromkeys(heldout)),
        "heldout_titles": [a["title"] for a in heldout_articles],
        "train_titles": [a["title"] for a in train_articles],
    }


@pytest.fixture(scope="session")
def trained(jglue, tmp_path_factory):
    work = tmp_path_factory.mktemp("tokenizer")
    corpus = work / "train.txt"
    corpus.write_text("\n".join(jglue["train_lines"]) + "\n", encoding="utf-8")
    report = train_tokenizer([corpus], work / "tok", vocab_size=VOCAB_SIZE)
    from transformers import AutoTokenizer

    return {"dir": work / "tok", "report": report, "tok": AutoTokenizer.from_pretrained(str(work / "tok"))}


def _prepared_ids(data_dir: Path) -> list[int]:
    from bigbird_ja.data import read_manifest
    from bigbird_ja.data.format import shard_infos

    manifest = read_manifest(data_dir)
    return [int(i) for info in shard_infos(manifest)
            for i in np.fromfile(data_dir / info.tokens_file, dtype=manifest["dtype"])]


def _small_corpus(path: Path, n: int = 1500) -> Path:
    lines = _sentences(JGLUE / "jsts-v1.3" / "valid-v1.3.json", ["sentence1", "sentence2"])[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# The saved tokenizer as transformers sees it


def test_autotokenizer_is_fast_with_byte_fallback_and_documented_ids(trained):
    tok = trained["tok"]
    assert tok.is_fast
    assert len(tok) == VOCAB_SIZE == trained["report"].vocab_size
    ids = {"[PAD]": tok.pad_token_id, "[UNK]": tok.unk_token_id, "[CLS]": tok.cls_token_id,
           "[SEP]": tok.sep_token_id, "[MASK]": tok.mask_token_id}
    assert ids == SPECIAL_TOKENS == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    assert tok.convert_ids_to_tokens([5, 260]) == ["<0x00>", "<0xFF>"]
    model = json.loads((trained["dir"] / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert model["type"] == "Unigram" and model["byte_fallback"] is True
    from bigbird_ja import BigBirdJaConfig

    assert BigBirdJaConfig().pad_token_id == tok.pad_token_id


def test_autotokenizer_keeps_byte_fallback_beside_a_model_config(trained, tmp_path):
    """A checkpoint folder (config.json + tokenizer) still loads our tokenizer.json, not a rebuilt DeBERTa one."""
    import shutil

    from transformers import AutoTokenizer

    from bigbird_ja import BigBirdJaConfig

    folder = tmp_path / "checkpoint"
    shutil.copytree(trained["dir"], folder)
    BigBirdJaConfig(vocab_size=VOCAB_SIZE).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.is_fast and tok.convert_ids_to_tokens(tok("𪚲")["input_ids"]) == [
        "[CLS]", "<0xF0>", "<0xAA>", "<0x9A>", "<0xB2>", "[SEP]"]


def test_single_and_pair_templates(trained):
    tok = trained["tok"]
    a, b = "日本の首都は東京です。", "首都はどこ？"
    ids_a = tok(a, add_special_tokens=False)["input_ids"]
    ids_b = tok(b, add_special_tokens=False)["input_ids"]
    single = tok(a)
    assert single["input_ids"] == [2] + ids_a + [3]
    pair = tok(a, b)
    assert pair["input_ids"] == [2] + ids_a + [3] + ids_b + [3]
    assert pair["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
    assert tok.decode(pair["input_ids"], skip_special_tokens=True) == unicodedata.normalize("NFKC", a + b)


def test_fast_tokenizer_matches_sentencepiece(trained, jglue):
    """The tokenizers pipeline reproduces the trained SentencePiece model (normaliser, whitespace, byte fallback)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(trained["dir"] / "sentencepiece.model"))
    texts = jglue["heldout"] + [t for t in HOSTILE if "[" not in t]  # "[CLS]" literals are special tokens in HF
    fast = trained["tok"](texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, ids in zip(texts, fast) if sp.encode(t) != ids]
    assert not mismatches, mismatches[:5]


# ----------------------------------------------------------------------------------------------------------------
# Round trip, offsets, no [UNK]


def test_round_trip_on_heldout_text(trained, jglue):
    tok = trained["tok"]
    texts = jglue["heldout"]
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    bad = [(t, tok.decode(ids)) for t, ids in zip(texts, encoded)
           if tok.decode(ids) != unicodedata.normalize("NFKC", t)]
    assert not bad, bad[:5]
    assert len(texts) > 10000


def _check_offsets(tok, text: str) -> list[tuple[int, int]]:
    """Every token maps to its exact span of the ORIGINAL string: spans tile the text, and tokens whose spans
    overlap (the bytes of one character; the pieces of one character NFKC expands, such as "㌔" -> "キロ") decode
    together to NFKC of their joint span.

    One gap is allowed, and only of one kind: when NFKC composes several original characters into one (half-width
    "ｶﾞ" -> "ガ", "e" + U+0301 -> "é"), the `tokenizers` alignment gives the composed character the span of its
    first source character only; the absorbed combining marks belong to no token. Returns those gaps.
    """
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    groups: list[tuple[tuple[int, int], list[int]]] = []
    for idx, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if groups and start < groups[-1][0][1]:
            (g_start, g_end), ids = groups[-1]
            groups[-1] = ((g_start, max(g_end, end)), ids + [idx])
        else:
            groups.append(((start, end), [idx]))
    gaps = []
    position = 0
    for n, ((start, end), ids) in enumerate(groups):
        assert start == position and end > start, (text, groups)
        stop = groups[n + 1][0][0] if n + 1 < len(groups) else len(text)
        if stop != end:
            absorbed = unicodedata.normalize("NFKD", text[end:stop])
            assert absorbed and all(unicodedata.combining(c) for c in absorbed), (text, (start, end), stop)
            gaps.append((end, stop))
        assert tok.decode(ids) == unicodedata.normalize("NFKC", text[start:stop]), (text, text[start:end], ids)
        position = stop
    assert position == len(text), (text, groups)
    return gaps


def test_offsets_are_exact_spans_of_the_original_text(trained, jglue):
    tok = trained["tok"]
    for text in jglue["heldout"]:
        assert _check_offsets(tok, text) == [], text
    for text in HOSTILE:
        if "[" not in text:
            _check_offsets(tok, text)
    # Whitespace: each space is a token "▁" of its own, so the word after it starts at its own first character.
    enc = tok("東京 タワー", add_special_tokens=False, return_offsets_mapping=True)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    spans = [tuple(span) for span in enc["offset_mapping"]]
    assert tokens[spans.index((2, 3))] == "▁" and any(start == 3 for start, _ in spans)
    assert all(not (t.startswith("▁") and len(t) > 1) for t in tokens)
    # Width variants: offsets point at the un-normalised characters ("ＡＢＣ" is 3 characters, not bytes).
    enc = tok("ＡＢＣの㍻", add_special_tokens=False, return_offsets_mapping=True)
    assert enc["offset_mapping"][0][0] == 0 and enc["offset_mapping"][-1] == (4, 5)
    # The documented limit: a voiced mark NFKC composes into the kana before it is covered by no token.
    assert _check_offsets(tok, "ｶﾞｷﾞ") == [(1, 2), (3, 4)]


def test_no_unknown_token_on_any_input(trained):
    tok = trained["tok"]
    for text in HOSTILE:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        if "[" not in text:
            assert tok.decode(ids) == unicodedata.normalize("NFKC", text)
    # Byte fallback really is used: an astral kanji absent from training is spelled as its 4 UTF-8 bytes.
    tokens = tok.convert_ids_to_tokens(tok("𪚲", add_special_tokens=False)["input_ids"])
    assert tokens == ["<0xF0>", "<0xAA>", "<0x9A>", "<0xB2>"]
    # ... and a literal that spells a byte piece stays text.
    assert tok.decode(tok("<0x41>", add_special_tokens=False)["input_ids"]) == "<0x41>"


# ----------------------------------------------------------------------------------------------------------------
# QA: answers fall on token boundaries


def test_heldout_jsquad_answers_fall_on_token_boundaries(trained, jglue):
    result = answer_boundary_rate(trained["tok"], JSQUAD, titles=jglue["heldout_titles"])
    print(f"\nanswer-boundary rate on held-out JSQuAD articles (vocab {VOCAB_SIZE}, MeCab word boundaries): {result}")
    for failure in result.failures:
        print("  ", failure)
    assert result.questions > 2000
    assert result.rate >= 0.995, result


# ----------------------------------------------------------------------------------------------------------------
# Bad input, vocabulary size, CLI


def test_bad_input_is_counted_with_file_and_line(tmp_path, jglue):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\n".join([
        "正しい行です。".encode(),                       # 1 fine
        b"\xff\xfe\x80 broken " + "行".encode(),         # 2 invalid UTF-8: the 3 bad bytes dropped
        b"",                                               # 3 empty: skipped
        "NUL\x00と\x07ベル".encode(),                      # 4 control characters: removed
        "絵文字😀です".encode(),                            # 5 emoji: kept
        "ｶﾀｶﾅとＡＢＣ".encode(),                            # 6 width variants: normalised
        b"   \t  ",                                        # 7 whitespace only (a tab is whitespace): skipped
        "最後の行".encode() + b"\r",                        # 8 Windows line end: not an issue
    ]) + b"\n")
    # 1 of bad.txt's 6 non-blank lines has invalid bytes: more than the default share that refuses a file (1%).
    report = train_tokenizer([bad, _small_corpus(tmp_path / "ok.txt")], tmp_path / "tok", vocab_size=2500,
                             shrink_vocab=True, max_invalid_fraction=1.0)
    # The issues file has the format of prepare's issues.jsonl (the same `cleaning.IssueLog` writes both).
    every = [json.loads(line) for line in (tmp_path / "tok" / "input_issues.jsonl").read_text().splitlines()]
    count = {(r["kind"], r["line"]): r["count"] for r in every if r["file"] == str(bad)}
    assert count == {("invalid_utf8", 2): 3, ("empty_line", 3): 1, ("control_characters", 4): 2, ("emoji", 5): 1,
                     ("nfkc_normalized", 6): 1, ("empty_line", 7): 1}
    assert every[0] == {"kind": "invalid_utf8", "file": str(bad), "line": 2, "count": 3,
                        "action": "invalid bytes dropped"}
    assert report.files[0] == {"path": str(bad), "lines": 8, "lines_used": 6}
    assert report.lines_read == report.lines_used + report.lines_skipped
    assert report.issue_examples["control_characters"] == [f"{bad}:4"]
    saved = json.loads((tmp_path / "tok" / "training_report.json").read_text(encoding="utf-8"))
    assert saved["issue_counts"] == report.issue_counts
    for kind in ("invalid_utf8", "control_characters", "empty_line"):  # text lost: every instance is listed
        assert sum(r["count"] for r in every if r["kind"] == kind) == report.issue_counts[kind]
    assert f"invalid_utf8: 3 (invalid bytes dropped), e.g. {bad}:2" in report.summary()


def test_long_lines_are_split_and_sampling_caps_memory(tmp_path):
    corpus = _small_corpus(tmp_path / "ok.txt")
    long_line = "。".join(["これは長い段落の一文です"] * 400)  # ~5,000 characters
    with open(corpus, "a", encoding="utf-8") as handle:
        handle.write(long_line + "\n")
    report = train_tokenizer([corpus], tmp_path / "tok", vocab_size=1500, input_sentence_size=500,
                             shrink_vocab=True)
    assert report.issue_counts["long_line_split"] == 1
    assert report.sentences > 1500 and report.sentences_sampled == 500


def test_vocab_too_large_names_the_largest_size_and_shrink_uses_it(tmp_path):
    corpus = _small_corpus(tmp_path / "ok.txt", n=300)
    with pytest.raises(VocabSizeError, match=r"largest vocabulary size that works is \d+") as info:
        train_tokenizer([corpus], tmp_path / "a", vocab_size=50000)
    limit = info.value.limit
    assert 261 < limit < 50000 and str(limit) in str(info.value)
    assert not (tmp_path / "a").exists()  # a failed run leaves nothing behind
    report = train_tokenizer([corpus], tmp_path / "b", vocab_size=50000, shrink_vocab=True)
    assert report.shrunk and report.vocab_size == limit and report.requested_vocab_size == 50000
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "b"))) == limit


def test_vocab_too_small_and_bad_arguments_are_errors(tmp_path):
    corpus = _small_corpus(tmp_path / "ok.txt", n=300)
    with pytest.raises(ValueError, match="at least 262"):
        train_tokenizer([corpus], tmp_path / "a", vocab_size=100)
    with pytest.raises(VocabSizeError, match="smaller than this corpus needs"):
        train_tokenizer([corpus], tmp_path / "a", vocab_size=300)
    with pytest.raises(ValueError, match="pretokenize='jumanpp' is not one of"):
        train_tokenizer([corpus], tmp_path / "a", pretokenize="jumanpp")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        train_tokenizer([corpus], tmp_path / "full")


def test_missing_analyser_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fugashi", None)  # makes `import fugashi` fail
    with pytest.raises(ImportError, match=r"pip install 'bigbird-ja\[tokenizer\]'"):
        train_tokenizer([_small_corpus(tmp_path / "ok.txt", n=10)], tmp_path / "tok", vocab_size=1000)


def test_cli_train_tokenizer_end_to_end(tmp_path, capsys):
    corpus = _small_corpus(tmp_path / "ok.txt", n=300)
    # Too large without --shrink-vocab: exit status 2 and a message naming the size that works.
    assert cli.main(["train-tokenizer", "--input", str(corpus), "--vocab-size", "50000",
                     "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "train-tokenizer: error: vocab_size=50000" in err and "--shrink-vocab" in err
    # The real command line, in a fresh process.
    out = tmp_path / "tok"
    run = subprocess.run(
        [sys.executable, "-m", "bigbird_ja.cli", "train-tokenizer", "--input", str(corpus), "--vocab-size",
         "50000", "--shrink-vocab", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "unigram tokenizer" in run.stdout and "shrunk from 50000" in run.stdout
    for name in ("tokenizer.json", "tokenizer_config.json", "sentencepiece.model", "training_report.json",
                 "input_issues.jsonl"):
        assert (out / name).is_file(), name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.is_fast and tok("猫")["input_ids"][0] == 2


def test_fuzz_the_project_tokenizer_through_prepare_and_the_collator(trained, tmp_path):
    """Thousands of random Unicode strings (control characters, emoji, width variants, invalid UTF-8) through the
    trained tokenizer, `prepare` and the MLM collator: no exception, no [UNK], offsets inside the text."""
    import random

    import torch
    from torch.utils.data import DataLoader

    from bigbird_ja.data import CleaningOptions, MLMCollator, PackedDataset, PrepareOptions, prepare
    from test_data import _random_string

    tok = trained["tok"]
    rng = random.Random(7)
    texts = [_random_string(rng) for _ in range(3000)]
    texts += ["\x00\x01\u200b", "ｶﾞｷﾞｸﾞ１２３ＡＢＣ", "🇯🇵👨‍👩‍👧 絵文字", "\ud83d".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
    for text in texts:
        encoded = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert tok.unk_token_id not in encoded["input_ids"], text
        assert all(0 <= start <= end <= len(text) for start, end in encoded["offset_mapping"]), text
        tok.decode(encoded["input_ids"])
    raw = b"\n".join(t.encode("utf-8") + (b"\xff\xfe" if i % 11 == 0 else b"") for i, t in enumerate(texts))
    (tmp_path / "fuzz.txt").write_bytes(raw)
    # Every 11th line invalid on purpose: more than the default share that refuses a file (1%).
    report = prepare(trained["dir"], [tmp_path / "fuzz.txt"], tmp_path / "data", seq_len=64, num_workers=0,
                     progress=False, options=PrepareOptions(cleaning=CleaningOptions(max_invalid_fraction=1.0)))
    assert report.issue_counts.get("invalid_utf8", 0) > 0
    collator = MLMCollator.from_tokenizer(tok)
    batches = 0
    for batch in DataLoader(PackedDataset(tmp_path / "data", num_epochs=1), batch_size=32, collate_fn=collator):
        assert batch["input_ids"].shape[1] == 64 and (batch["labels"] != -100).any()
        batches += 1
    assert batches > 0
    collator([torch.randint(0, len(tok), (rng.randint(1, 40),)) for _ in range(64)])


# ----------------------------------------------------------------------------------------------------------------
# The trainer cleans its text exactly as `prepare` does


# One line each (bytes, so invalid UTF-8 can be written): what the cleaning policy decides about.
TRICKY_LINES = [
    "列1\t列2\t\t列3".encode(),  # tabs: kept
    "前\ufffe中\uffff後".encode(),  # the noncharacters U+FFFE/U+FFFF: removed
    "絵文字😀👨\u200d👩\u200d👧❤\ufe0f🇯🇵です".encode(),  # emoji with ZWJ and VS16: kept
    "NUL\x00BEL\x07US\x1fDEL\x7fNEL\x85C1\x9f".encode(),  # C0, DEL, C1 controls: removed
    "\x0b縦タブ\x0c改ページ".encode(),
    "ＡＢＣ１２３ｶﾞｷﾞ㍻①\u3000全角".encode(),  # NFKC
    "e\u0301te\u0301 café".encode(),  # decomposed accents: composed by NFKC
    "行中の\r復帰".encode(),  # a lone CR inside a line
    "ゼロ\u200b幅\u200c非\u200d結合\u2060語\ufeffBOM".encode(),  # zero-width characters, a BOM inside text
    "行\u2028区切り\u2029段落".encode(),
    "<0x09> と <0xE3> は文字列".encode(),
    b"\xff\xfe broken " + "文字".encode() + b" \xc3",  # invalid UTF-8
    b"\xed\xa0\x80 surrogate " + "字".encode(),  # an encoded lone surrogate (invalid UTF-8)
    "  先頭と末尾の空白  ".encode(),
    "\x00\x01\t".encode(),  # nothing left but a tab: empty for both
]


class _Captured(Exception):
    pass


def _trainer_sentences(path: Path, out: Path, monkeypatch) -> list[str]:
    """The sentences `train_tokenizer` hands to SentencePiece (word delimiters removed)."""
    seen: list[str] = []

    def capture(sentences, *args, **kwargs):
        seen.extend(s.replace(tokenization._WORD_DELIMITER, "") for s in sentences)
        raise _Captured

    monkeypatch.setattr(tokenization, "_train_spm", capture)
    with pytest.raises(_Captured):  # 2 of the 15 TRICKY_LINES are invalid UTF-8: more than the default 1% share
        train_tokenizer([path], out, pretokenize="none", max_invalid_fraction=1.0)
    return seen


def _prepared_texts(path: Path, out: Path, chars: set[str]) -> list[str]:
    """The documents `prepare` packs, spelled back through a tokenizer with one id per character and no normaliser
    (so the ids are exactly the text prepare cleaned; a character it should have removed shows as itself)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bigbird_ja.data import CleaningOptions, PrepareOptions, prepare

    vocab = dict(SPECIAL_TOKENS)
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(sorted(chars))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(out / "chars"))
    prepare(out / "chars", [path], out / "data", seq_len=16, num_workers=0, progress=False,
            options=PrepareOptions(cleaning=CleaningOptions(max_invalid_fraction=1.0)))  # as in _trainer_sentences
    by_id = {i: c for c, i in vocab.items()}
    stream = [i for n, i in enumerate(_prepared_ids(out / "data")) if n % 16 and i != SPECIAL_TOKENS["[PAD]"]]
    return "".join(by_id[i] if i != SPECIAL_TOKENS["[SEP]"] else "\n" for i in stream).split("\n")[:-1]


def test_trainer_and_prepare_clean_every_tricky_line_identically(tmp_path, monkeypatch):
    """Tabs, controls, noncharacters, emoji, NFKC cases, CRLF, zero-width characters, invalid UTF-8: the text
    SentencePiece learns from is the text `prepare` packs, character for character."""
    # The same lines, Windows line ends: one a line for the trainer, one document each for prepare.
    (tmp_path / "lines.txt").write_bytes(b"\r\n".join(TRICKY_LINES) + b"\r\n")
    (tmp_path / "docs.txt").write_bytes(b"\r\n\r\n".join(TRICKY_LINES) + b"\r\n")
    trained_on = _trainer_sentences(tmp_path / "lines.txt", tmp_path / "tok", monkeypatch)
    decoded = [line.decode("utf-8", "ignore") for line in TRICKY_LINES]
    chars = {c for text in decoded for c in text + unicodedata.normalize("NFKC", text)}
    packed = _prepared_texts(tmp_path / "docs.txt", tmp_path, chars)
    assert trained_on == packed
    assert "列1\t列2\t\t列3" in trained_on and "前中後" in trained_on  # the policy: tabs kept, U+FFFE/FFFF not
    assert len(trained_on) == len(TRICKY_LINES) - 1


def test_a_tokenizer_trained_on_tabs_keeps_them_as_a_piece_through_prepare(tmp_path):
    """Tab-separated training text teaches the tokenizer a tab piece, so `prepare` packs a tab as that piece and
    never as the byte piece <0x09> (the trainer once turned tabs into spaces that prepare never sees)."""
    from transformers import AutoTokenizer

    from bigbird_ja.data import prepare

    sentences = _sentences(JGLUE / "jsts-v1.3" / "valid-v1.3.json", ["sentence1", "sentence2"])[:2000]
    lines = [f"{a}\t{b}" for a, b in zip(sentences[0::2], sentences[1::2])]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_tokenizer([tmp_path / "train.txt"], tmp_path / "tok", vocab_size=2000, shrink_vocab=True)
    (tmp_path / "docs.txt").write_text("\n\n".join(lines[:50]) + "\n", encoding="utf-8")
    prepare(tmp_path / "tok", [tmp_path / "docs.txt"], tmp_path / "data", seq_len=64, num_workers=0, progress=False)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = _prepared_ids(tmp_path / "data")
    assert tok.convert_tokens_to_ids("<0x09>") not in ids
    tab = tok.convert_tokens_to_ids("\t")
    assert tab != tok.unk_token_id and ids.count(tab) == 50
