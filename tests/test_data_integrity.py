"""Data integrity (issue 12): input in another encoding, empty input, prepared folders whose files disagree, token ids
outside the vocabulary and JSQuAD fields of the wrong type are errors that name the file, the values and the fix.

The tokenizer is the small one of `test_data` (trained in seconds from the bundled sample corpus); train-tokenizer
runs stop before SentencePiece (the refusals come first), or capture the sentences it would be given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bigbird_ja import cli, tokenization
from bigbird_ja.data import CleaningOptions, PackedDataset, PrepareOptions, prepare, read_manifest, sample_documents
from bigbird_ja.data.format import check_shard_files, shard_infos
from test_data import _train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DOCS = sample_documents()[:12]
# Western European text: what a Latin-1 file holds (every line has an accented letter).
LATIN = ["Le café est très bon à Paris.", "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
         "El niño comió piña en la montaña.", "Ça coûte cher, señor: 5 £ à la fenêtre."] * 6


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return _train_tokenizer(tmp_path_factory.mktemp("tok"), 1200)


def _docs_text(docs=DOCS) -> str:
    return "\n\n".join(docs) + "\n"


def _shards(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.name.startswith("shard-")}


def _prepare(tok_dir, inputs, out, **options):
    return prepare(tok_dir, inputs, out, seq_len=64, num_workers=0, progress=False,
                   options=PrepareOptions(cleaning=CleaningOptions(**options)))


class _Captured(Exception):
    pass


def _trainer_sentences(paths, out: Path, monkeypatch, **kwargs) -> list[str]:
    """The sentences `train_tokenizer` would hand to SentencePiece (training itself is skipped)."""
    seen: list[str] = []

    def capture(sentences, *args, **kw):
        seen.extend(s.replace(tokenization._WORD_DELIMITER, "") for s in sentences)
        raise _Captured

    monkeypatch.setattr(tokenization, "_train_spm", capture)
    with pytest.raises(_Captured):
        tokenization.train_tokenizer(paths, out, pretokenize="none", **kwargs)
    return seen


# ----------------------------------------------------------------------------------------------------------------
# 4. A manifest that disagrees with its shards' own metadata


@pytest.fixture(scope="module")
def packed_256(tmp_path_factory, tok_dir) -> Path:
    root = tmp_path_factory.mktemp("packed")
    (root / "docs.txt").write_text(_docs_text(sample_documents()[:40]), encoding="utf-8")
    prepare(tok_dir, [root / "docs.txt"], root / "data", seq_len=256, num_workers=0, shard_tokens=256 * 4,
            progress=False)
    return root / "data"


def _edit_manifest(data_dir: Path, edit) -> None:
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _halve_seq_len(m):
    """The lie of the issue: seq_len 128 over shards packed at 256, with num_sequences doubled so sizes agree."""
    m["seq_len"] //= 2
    for shard in m["shards"]:
        shard["num_sequences"] *= 2
    m["totals"]["num_sequences"] *= 2


def _other_fingerprint(m):
    m["tokenizer_fingerprint"] = "sha256:" + "0" * 64


def _more_documents(m):
    m["shards"][1]["num_documents"] += 1


LIES = {"seq_len": (_halve_seq_len, "shard-00000.json", "seq_len", "256", "128"),
        "fingerprint": (_other_fingerprint, "shard-00000.json", "tokenizer_fingerprint", "sha256:0000", "sha256:"),
        "num_documents": (_more_documents, "shard-00001.json", "num_documents", "", "")}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_manifest_that_disagrees_with_its_shard_metadata_is_refused(packed_256, tmp_path, lie):
    edit, file, field, *values = LIES[lie]
    data = tmp_path / "data"
    shutil.copytree(packed_256, data)
    _edit_manifest(data, edit)
    with pytest.raises(ValueError) as info:
        PackedDataset(data)
    message = str(info.value)
    print(message)
    for part in (file, field, *values, "corrupt or mixed", "re-run prepare"):
        assert part in message, (part, message)
    with pytest.raises(ValueError, match=field):
        check_shard_files(data, read_manifest(data))


def test_pretraining_preflight_names_the_lying_manifest(packed_256, tmp_path):
    from bigbird_ja.training import load_pretrain_config
    from bigbird_ja.training.preflight import run_preflight

    data = tmp_path / "data"
    shutil.copytree(packed_256, data)
    _edit_manifest(data, _halve_seq_len)
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
        f"--data.dir={data}", f"--run.output_dir={tmp_path / 'run'}", "--data.eval_shards=0"])
    report = run_preflight(cfg, rank=0, world_size=1, num_nodes=1, tokenizer=None)
    text = "\n".join(report.problems)
    assert "shard-00000.json" in text and "seq_len" in text and "corrupt or mixed" in text, text


def test_a_manifest_whose_token_counts_disagree_with_its_sequences_is_refused(packed_256, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(packed_256, data)

    def edit(m):
        m["shards"][0]["num_tokens"] -= 1
    _edit_manifest(data, edit)
    with pytest.raises(ValueError, match=r"num_tokens.*corrupt or mixed"):
        PackedDataset(data)


# ----------------------------------------------------------------------------------------------------------------
# 6. Input that is not UTF-8; empty input


UTF16_CASES = {  # name: (bytes of the documents, what the error calls them, the --encoding that reads them)
    "utf-16 with BOM": (lambda t: t.encode("utf-16"), "UTF-16 LE", "utf-16"),
    "utf-16-be with BOM": (lambda t: b"\xfe\xff" + t.encode("utf-16-be"), "UTF-16 BE", "utf-16"),
    "utf-16-le without BOM": (lambda t: t.encode("utf-16-le"), "UTF-16 LE", "utf-16-le"),
    "utf-32 with BOM": (lambda t: t.encode("utf-32"), "UTF-32 LE", "utf-32"),
}


@pytest.mark.parametrize("case", sorted(UTF16_CASES))
def test_prepare_refuses_utf16_input_and_reads_it_with_the_encoding_named(tok_dir, tmp_path, case):
    encode, looks, encoding = UTF16_CASES[case]
    (tmp_path / "wide.txt").write_bytes(encode(_docs_text()))
    with pytest.raises(ValueError) as info:
        _prepare(tok_dir, [tmp_path / "wide.txt"], tmp_path / "out")
    message = str(info.value)
    print(message)
    assert "wide.txt" in message and looks in message and f"--encoding {encoding}" in message, message
    assert not (tmp_path / "out" / "manifest.json").exists()
    # With the encoding given, the shards are those of the same text in UTF-8.
    (tmp_path / "utf8.txt").write_text(_docs_text(), encoding="utf-8")
    _prepare(tok_dir, [tmp_path / "utf8.txt"], tmp_path / "ref")
    _prepare(tok_dir, [tmp_path / "wide.txt"], tmp_path / "ok", encoding=encoding)
    assert _shards(tmp_path / "ok") == _shards(tmp_path / "ref")


def test_train_tokenizer_refuses_utf16_input_and_reads_it_with_the_encoding_named(tmp_path, monkeypatch, capsys):
    lines = [line for doc in DOCS for line in doc.splitlines()]
    (tmp_path / "wide.txt").write_bytes(("\n".join(lines) + "\n").encode("utf-16"))
    assert cli.main(["train-tokenizer", "--input", str(tmp_path / "wide.txt"), "--out", str(tmp_path / "tok"),
                     "--vocab-size", "300", "--shrink-vocab", "--pretokenize", "none"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "wide.txt" in err and "UTF-16 LE" in err and "--encoding utf-16" in err, err
    assert not (tmp_path / "tok").exists()
    assert _trainer_sentences([tmp_path / "wide.txt"], tmp_path / "tok", monkeypatch, encoding="utf-16") == lines


@pytest.mark.parametrize("encoding", ["latin-1", "cp932", "euc-jp"])
def test_prepare_refuses_text_that_is_not_utf8_and_reads_it_with_encoding(tok_dir, tmp_path, encoding):
    docs = LATIN if encoding == "latin-1" else DOCS
    text = _docs_text(docs)
    (tmp_path / "in.txt").write_bytes(text.encode(encoding))
    with pytest.raises(ValueError) as info:
        _prepare(tok_dir, [tmp_path / "in.txt"], tmp_path / "out")
    message = str(info.value)
    print(message)
    assert "in.txt" in message and "not UTF-8" in message and "--encoding" in message, message
    assert "%" in message and "--max-invalid-fraction" in message, message  # the fraction and the other way out
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "utf8.txt").write_text(text, encoding="utf-8")
    _prepare(tok_dir, [tmp_path / "utf8.txt"], tmp_path / "ref")
    _prepare(tok_dir, [tmp_path / "in.txt"], tmp_path / "ok", encoding=encoding)
    assert _shards(tmp_path / "ok") == _shards(tmp_path / "ref")


def test_train_tokenizer_refuses_latin1_input_with_the_invalid_fraction(tmp_path, monkeypatch, capsys):
    (tmp_path / "latin.txt").write_bytes(("\n".join(LATIN) + "\n").encode("latin-1"))
    assert cli.main(["train-tokenizer", "--input", str(tmp_path / "latin.txt"), "--out", str(tmp_path / "tok"),
                     "--vocab-size", "300", "--shrink-vocab", "--pretokenize", "none"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "latin.txt" in err and "not UTF-8" in err and "24 of 24 lines" in err and "--encoding" in err, err
    assert _trainer_sentences([tmp_path / "latin.txt"], tmp_path / "tok", monkeypatch,
                              encoding="latin-1") == LATIN


def test_a_few_invalid_lines_pass_below_the_threshold_and_are_refused_above_it(tok_dir, tmp_path, monkeypatch):
    lines = [line for doc in sample_documents() for line in doc.splitlines()][:99]
    (tmp_path / "one-bad.txt").write_bytes(b"\n".join(line.encode() for line in lines) + b"\nbad \xff byte\n")
    report = _prepare(tok_dir, [tmp_path / "one-bad.txt"], tmp_path / "ok")  # 1 of 100 lines: at the default 1%
    assert report.issue_counts["invalid_utf8"] == 1
    with pytest.raises(ValueError, match=r"1 of 100 lines \(1\.0%\).*max_invalid_fraction=0\.5%"):
        _prepare(tok_dir, [tmp_path / "one-bad.txt"], tmp_path / "strict", max_invalid_fraction=0.005)
    with pytest.raises(ValueError, match=r"1 of 100 lines"):
        _trainer_sentences([tmp_path / "one-bad.txt"], tmp_path / "tok", monkeypatch, max_invalid_fraction=0.005)


def test_bad_encoding_options_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="encoding='klingon'.*cp932"):
        CleaningOptions(encoding="klingon")
    with pytest.raises(ValueError, match="max_invalid_fraction=2"):
        CleaningOptions(max_invalid_fraction=2)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\x00\x01\n\n\x07\n"])
def test_prepare_refuses_input_without_documents(tok_dir, tmp_path, capsys, content):
    (tmp_path / "empty.txt").write_bytes(content)
    with pytest.raises(ValueError) as info:
        _prepare(tok_dir, [tmp_path / "empty.txt"], tmp_path / "out")
    message = str(info.value)
    assert "no documents" in message and "empty.txt" in message, message
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(tmp_path / "empty.txt"), "--out",
                     str(tmp_path / "cli"), "--no-progress", "--num-workers", "0"]) == 2
    assert "no documents" in capsys.readouterr().err


def test_train_tokenizer_refuses_input_without_text(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"\n \n\x00\n")
    assert cli.main(["train-tokenizer", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "tok"),
                     "--vocab-size", "300", "--pretokenize", "none"]) == 2
    err = capsys.readouterr().err
    assert "no usable text" in err and "empty.txt" in err, err


def test_a_utf8_bom_starts_a_jsonl_file_without_losing_its_first_record(tok_dir, tmp_path):
    rows = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + rows.encode())
    (tmp_path / "plain.jsonl").write_bytes(rows.encode())
    report = _prepare(tok_dir, [tmp_path / "bom.jsonl"], tmp_path / "bom")
    assert report.issue_counts.get("invalid_json", 0) == 0 and report.num_documents == len(DOCS)
    _prepare(tok_dir, [tmp_path / "plain.jsonl"], tmp_path / "plain")
    assert _shards(tmp_path / "bom") == _shards(tmp_path / "plain")


# ----------------------------------------------------------------------------------------------------------------
# 9. Token ids outside the vocabulary: corruption, not another tokenizer


def test_out_of_vocabulary_ids_in_a_shard_are_named_as_corruption(packed_256, tmp_path):
    from torch.utils.data import DataLoader

    from bigbird_ja.data import MLMCollator

    data = tmp_path / "data"
    shutil.copytree(packed_256, data)
    manifest = read_manifest(data)
    info = shard_infos(manifest)[1]
    tokens = np.fromfile(data / info.tokens_file, dtype="<u2")
    tokens[300] = 60000  # a flipped byte: far outside the 1,200-id vocabulary
    tokens.tofile(data / info.tokens_file)
    collator = MLMCollator(vocab_size=manifest["vocab_size"], special_token_ids=list(range(5)), pad_token_id=0,
                           mask_token_id=4)
    with pytest.raises(ValueError) as err:
        for _ in DataLoader(PackedDataset(data, shuffle=False, num_epochs=1), batch_size=4, collate_fn=collator):
            pass
    message = str(err.value)
    print(message)
    for part in ("shard-00001.bin", "60000", "1200", "corrupt"):
        assert part in message, (part, message)
    assert "another tokenizer" not in message


# ----------------------------------------------------------------------------------------------------------------
# 10. JSQuAD fields of the wrong type


def _squad(answer: dict | None = None, **qa_fields) -> dict:
    qa = {"id": "q-17", "question": "何が好き?", "answers": [answer or {"text": "猫", "answer_start": 0}]}
    qa.update(qa_fields)
    return {"data": [{"title": "t", "paragraphs": [{"context": "猫が好き", "qas": [qa]}]}]}


WRONG_TYPES = {
    "answer_start str": (_squad({"text": "猫", "answer_start": "0"}), "answer_start", "'0'", "str"),
    "answer_start float": (_squad({"text": "猫", "answer_start": 0.0}), "answer_start", "0.0", "float"),
    "answer_start bool": (_squad({"text": "猫", "answer_start": True}), "answer_start", "True", "bool"),
    "answer text int": (_squad({"text": 5, "answer_start": 0}), "text", "5", "int"),
    "question list": (_squad(question=["何"]), "question", "['何']", "list"),
    "answers dict": (_squad(answers={"text": "猫", "answer_start": 0}), "answers", "{", "dict"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_jsquad_fields_of_the_wrong_type_are_named_with_the_question(tmp_path, case):
    from bigbird_ja.finetune.jglue import DataFormatError, read_squad

    data, field, value, type_name = WRONG_TYPES[case]
    (tmp_path / "squad.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        read_squad(tmp_path / "squad.json")
    message = str(info.value)
    print(message)
    for part in (field, "q-17", value, type_name):
        assert part in message, (part, message)


def test_build_qa_examples_names_a_string_answer_start_as_a_type_error():
    from bigbird_ja.finetune.documents import build_qa_examples
    from bigbird_ja.finetune.jglue import DataFormatError, SquadArticle, SquadParagraph, SquadQuestion

    article = SquadArticle("t", [SquadParagraph("猫が好き", [SquadQuestion("q-17", "何?", [
        {"text": "猫", "answer_start": "0"}])])])
    with pytest.raises(DataFormatError, match=r"q-17.*answer_start.*'0'.*str"):
        build_qa_examples([article], on_mismatch="skip")


def test_pretraining_preflight_says_an_empty_data_folder_holds_no_sequences(packed_256, tmp_path):
    """A folder written before prepare refused empty input: the problem is the data, not data.eval_shards."""
    from bigbird_ja.training import load_pretrain_config
    from bigbird_ja.training.preflight import run_preflight

    data = tmp_path / "data"
    shutil.copytree(packed_256, data)

    def empty(m):
        m["shards"] = []
        m["totals"].update(num_sequences=0, num_tokens=0)
    _edit_manifest(data, empty)
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
        f"--data.dir={data}", f"--run.output_dir={tmp_path / 'run'}", "--data.eval_shards=1"])
    problems = run_preflight(cfg, rank=0, world_size=1, num_nodes=1, tokenizer=None).problems
    assert any("holds no sequences" in p for p in problems), problems
    assert not any("eval_shards" in p for p in problems), problems


def test_a_file_in_another_encoding_is_refused_from_its_first_lines_before_it_is_read(tok_dir, tmp_path,
                                                                                    monkeypatch):
    """Mostly invalid first lines refuse a file at once: nothing is tokenised (a large file costs no full pass)."""
    from bigbird_ja.data import preparation

    (tmp_path / "sjis.txt").write_bytes(_docs_text().encode("cp932"))
    monkeypatch.setattr(preparation, "_encode_chunk", lambda *a: pytest.fail("tokenised a refused file"))
    with pytest.raises(ValueError, match=r"48 of 48 lines \(100\.0%\).*decodes as cp932"):
        _prepare(tok_dir, [tmp_path / "sjis.txt"], tmp_path / "out")


def test_encodings_apply_to_json_lines_and_gzip_inputs(tok_dir, tmp_path):
    import gzip

    rows = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS)
    (tmp_path / "utf8.jsonl").write_text(rows, encoding="utf-8")
    with gzip.open(tmp_path / "wide.jsonl.gz", "wb") as f:
        f.write(rows.encode("utf-16"))
    with pytest.raises(ValueError, match=r"wide.jsonl.gz' looks like UTF-16 LE \(byte-order mark FF FE\)"):
        _prepare(tok_dir, [tmp_path / "wide.jsonl.gz"], tmp_path / "out")
    _prepare(tok_dir, [tmp_path / "utf8.jsonl"], tmp_path / "ref")
    _prepare(tok_dir, [tmp_path / "wide.jsonl.gz"], tmp_path / "ok", encoding="utf-16")
    assert _shards(tmp_path / "ok") == _shards(tmp_path / "ref")


def test_invalid_bytes_in_the_named_encoding_are_counted_and_dropped_like_invalid_utf8(tok_dir, tmp_path):
    # "\x81\x20" is no cp932 character: one invalid sequence on line 2, dropped as prepare drops invalid UTF-8.
    lines = ["一行目です。", "二行目\x00です。", "三行目です。"]
    data = [line.encode("cp932") for line in lines]
    data[1] = data[1].replace(b"\x00", b"\x81\x20")
    (tmp_path / "in.txt").write_bytes(b"\n".join(data) + b"\n")
    report = _prepare(tok_dir, [tmp_path / "in.txt"], tmp_path / "out", encoding="cp932", max_invalid_fraction=1.0)
    assert report.issue_counts["invalid_utf8"] == 1
    logged = [json.loads(line) for line in (tmp_path / "out" / "issues.jsonl").read_text().splitlines()]
    assert {(r["kind"], r["line"]) for r in logged} == {("invalid_utf8", 2)}
    (tmp_path / "ref.txt").write_text("一行目です。\n二行目 です。\n三行目です。\n", encoding="utf-8")
    _prepare(tok_dir, [tmp_path / "ref.txt"], tmp_path / "ref")
    assert _shards(tmp_path / "out") == _shards(tmp_path / "ref")
