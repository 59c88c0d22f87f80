"""Pretraining data: prepare (packing, determinism, atomicity, bad input), loading (resume, ranks, descriptors),
masking (rates, specials, spans, determinism), and a fuzz test.

Every tokenizer here is trained in a fixture from the bundled sample corpus with the `tokenizers` library, so the
tests need no download and do not depend on `bigbird_ja.tokenization`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bigbird_ja.data import (
    CleaningOptions, FeistelPermutation, MaskingOptions, MLMCollator, PackedDataset, PrepareOptions, SourceOptions,
    TokenizerMismatchError, check_tokenizer, prepare, read_manifest, sample_corpus_path,
    sample_documents, tokenizer_fingerprint,
)
from bigbird_ja.data.format import read_document_starts, shard_infos, token_dtype
from bigbird_ja.data.masking import IGNORE_INDEX

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


def _train_tokenizer(out: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("。", behavior="merged_with_previous"),
                                                 pre_tokenizers.Metaspace()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="[UNK]",
                                      max_piece_length=8)
    tok.train_from_iterator(sample_documents() + ["ＡＢＣ abc 123 ｶﾀｶﾅ"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return _train_tokenizer(tmp_path_factory.mktemp("tok"), 1200)


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """The sample corpus split over two text files (documents 0-29, 30-49)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = sample_documents()
    (root / "a.txt").write_text("\n\n".join(docs[:30]) + "\n", encoding="utf-8")
    (root / "b.txt").write_text("\n\n\n".join(docs[30:]), encoding="utf-8")  # extra blank lines, no final newline
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tok_dir, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("data") / "packed"
    prepare(tok_dir, [corpus_dir / "a.txt", corpus_dir / "b.txt"], out, seq_len=64, seed=3, num_workers=2,
            shard_tokens=64 * 20, progress=False)
    return out


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.backend_tokenizer.encode(unicodedata.normalize("NFKC", text), add_special_tokens=False).ids


def _all_tokens(data_dir: Path) -> np.ndarray:
    manifest = read_manifest(data_dir)
    rows = [np.fromfile(data_dir / info.tokens_file, dtype=manifest["dtype"]).reshape(-1, manifest["seq_len"])
            for info in shard_infos(manifest)]
    return np.concatenate(rows)


def _documents_of(rows: np.ndarray) -> list[list[int]]:
    """Undo the packing: drop [CLS] columns and final padding, split at [SEP]."""
    stream = rows[:, 1:].reshape(-1).tolist()
    while stream and stream[-1] == PAD:
        stream.pop()
    docs, current = [], []
    for t in stream:
        if t == SEP:
            docs.append(current)
            current = []
        else:
            current.append(t)
    assert current == [], "the stream must end with [SEP]"
    return docs


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------------------------
# prepare


def test_prepare_token_counts_and_document_order(prepared, tokenizer):
    manifest = read_manifest(prepared)
    expected = [_encode(tokenizer, doc) for doc in sample_documents()]
    totals = manifest["totals"]
    assert totals["num_documents"] == len(expected) == 50
    assert totals["num_document_tokens"] == sum(len(ids) for ids in expected)
    assert totals["num_tokens"] == totals["num_document_tokens"] + totals["num_separator_tokens"] + \
        totals["num_cls_tokens"] + totals["num_padding_tokens"]
    assert manifest["dtype"] == "uint16" and manifest["seq_len"] == 64 and manifest["seed"] == 3
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert len(manifest["shards"]) > 1  # 20 sequences per shard
    rows = _all_tokens(prepared)
    assert (rows[:, 0] == CLS).all()
    assert _documents_of(rows) == expected  # every document once, in order, nothing else
    # The .idx files point at the first token of every document.
    flat = rows.reshape(-1)
    starts, offset = [], 0
    for info in shard_infos(manifest):
        starts.extend((read_document_starts(prepared, info) + offset).tolist())
        offset += info.num_tokens
        assert json.loads((prepared / info.meta_file).read_text())["num_documents"] == info.num_documents
    assert len(starts) == 50
    assert [int(flat[s]) for s in starts] == [ids[0] for ids in expected]


def test_prepare_is_byte_identical_across_runs_and_worker_counts(tmp_path, tok_dir, corpus_dir, prepared):
    inputs = [corpus_dir / "a.txt", corpus_dir / "b.txt"]
    prepare(tok_dir, inputs, tmp_path / "again", seq_len=64, seed=3, num_workers=0, shard_tokens=64 * 20,
            progress=False)
    names = sorted(p.name for p in prepared.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (prepared / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    # A different seed only changes the recorded seed.
    prepare(tok_dir, inputs, tmp_path / "seed4", seq_len=64, seed=4, num_workers=1, shard_tokens=64 * 20,
            progress=False)
    assert (prepared / "shard-00000.bin").read_bytes() == (tmp_path / "seed4" / "shard-00000.bin").read_bytes()
    assert read_manifest(tmp_path / "seed4")["seed"] == 4


def test_killed_run_leaves_nothing_a_loader_reads(tmp_path, tok_dir, corpus_dir):
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from bigbird_ja.data import preparation as prepare_module
        from bigbird_ja.data.preparation import _ShardWriter, prepare
        original = _ShardWriter.write_rows
        def write_rows(self, rows):
            original(self, rows)
            if self.shards and self._file is not None and self._rows:  # shards done, the next half-written
                self._file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        _ShardWriter.write_rows = write_rows
        prepare({str(tok_dir)!r}, [{str(corpus_dir / "a.txt")!r}], {str(out)!r}, seq_len=32, num_workers=0,
                shard_tokens=32 * 4, progress=False, options=prepare_module.PrepareOptions(chunk_bytes=2000))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "manifest.json" not in [p.name for p in out.iterdir()]
    names = sorted(p.name for p in (out / "slices" / "slice-00000").iterdir())  # the unfinished slice's work
    assert "slice.json" not in names
    partial = [name for name in names if name.startswith(".shard-")]
    assert len(partial) == 1, names  # the half-written shard, under its temporary name only
    assert partial[0].split(".tmp-")[0][1:] not in names
    assert "shard-00000.bin" in names  # complete shards without a manifest are not read either
    with pytest.raises(FileNotFoundError, match="not a finished"):
        PackedDataset(out)
    # The next run into the same folder cleans up and succeeds.
    prepare(tok_dir, [corpus_dir / "a.txt"], out, seq_len=32, num_workers=0, shard_tokens=32 * 4, progress=False)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert PackedDataset(out).num_samples > 0


def test_failure_inside_the_writer_leaves_no_shard_or_manifest(tmp_path, tok_dir, corpus_dir, monkeypatch):
    from bigbird_ja.data import preparation as prepare_module

    original = prepare_module._ShardWriter.write_rows

    def failing(self, rows):
        original(self, rows)
        if self.total_rows > 6:
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(prepare_module._ShardWriter, "write_rows", failing)
    out = tmp_path / "failed"
    with pytest.raises(OSError, match="simulated"):
        prepare(tok_dir, [corpus_dir / "a.txt"], out, seq_len=32, num_workers=2, shard_tokens=32 * 4,
                progress=False, options=PrepareOptions(chunk_bytes=2000))
    names = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in names and not [n for n in names if n.startswith(".")], names
    with pytest.raises(FileNotFoundError):
        PackedDataset(out)


def test_existing_output_needs_overwrite(tmp_path, tok_dir, corpus_dir):
    out = tmp_path / "o"
    prepare(tok_dir, [corpus_dir / "b.txt"], out, seq_len=32, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="overwrite"):
        prepare(tok_dir, [corpus_dir / "b.txt"], out, seq_len=32, num_workers=0, progress=False)
    prepare(tok_dir, [corpus_dir / "a.txt"], out, seq_len=32, num_workers=0, progress=False, overwrite=True)
    assert read_manifest(out)["totals"]["num_documents"] == 30
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        prepare(tok_dir, [corpus_dir / "b.txt"], tmp_path / "other", seq_len=32, num_workers=0, progress=False)


def test_jsonl_parquet_and_saved_dataset_inputs_match_text(tmp_path, tok_dir, tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = sample_documents()[:12]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d, "id": i}, ensure_ascii=i % 2 == 0) + "\n"
                                              for i, d in enumerate(docs[:4])), encoding="utf-8")
    pq.write_table(pa.table({"body": docs[4:8]}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"body": docs[8:]}).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    prepare(tok_dir, [tmp_path / "d.jsonl"], out / "j", seq_len=32, num_workers=0, progress=False)
    opts = PrepareOptions(source=SourceOptions(text_field="body"))
    prepare(tok_dir, [tmp_path / "d.parquet", tmp_path / "saved"], out / "pa", seq_len=32, num_workers=0,
            progress=False, options=opts)
    got = _documents_of(_all_tokens(out / "j")) + _documents_of(_all_tokens(out / "pa"))
    assert got == [_encode(tokenizer, d) for d in docs]
    with pytest.raises(ValueError, match="no column 'text'"):
        prepare(tok_dir, [tmp_path / "d.parquet"], out / "bad", seq_len=32, num_workers=0, progress=False)


def test_bad_input_is_counted_with_file_and_line(tmp_path, tok_dir):
    path = tmp_path / "bad.txt"
    lines = [
        "良い文書です。".encode(),  # 1: doc 1
        b"",  # 2
        b"\xff\xfe broken " + "文字".encode() + b" \xc3",  # 3: doc 2, invalid UTF-8 (3 bad sequences)
        "二行目\x00にNUL、\x07ベル".encode(),  # 4: NUL and BEL
        b"",  # 5
        b"\x00\x01\x02",  # 6: doc 3 is only control characters -> empty
        b"",  # 7
        "ＡＢＣ１２３とｶﾀｶﾅ".encode(),  # 8: doc 4, NFKC
        "絵文字😀です".encode(),  # 9: emoji (and an unknown token)
    ]
    path.write_bytes(b"\n".join(lines) + b"\r\n")
    jpath = tmp_path / "bad.jsonl"
    jpath.write_text('{"text": "普通"}\n{"text": \n\n{"other": 1}\n{"text": "孤立\\ud800サロゲート"}\n{"text": 5}\n'
                     + json.dumps({"text": "長" * 3000}) + "\n", encoding="utf-8")
    # 1 of bad.txt's 6 lines has invalid bytes: above the default share that refuses a file (1%), so allowed here.
    opts = PrepareOptions(source=SourceOptions(piece_bytes=1000, max_json_line_bytes=4000),
                          cleaning=CleaningOptions(max_invalid_fraction=1.0))
    report = prepare(tok_dir, [path, jpath], tmp_path / "out", seq_len=32, num_workers=0, progress=False,
                     options=opts)
    counts = report.issue_counts
    assert counts["invalid_utf8"] == 3
    assert counts["control_characters"] == 2 + 3
    assert counts["empty_document"] == 1
    assert counts["nfkc_normalized"] == 1
    assert counts["emoji"] == 1
    assert counts["unknown_tokens"] >= 1
    assert counts["invalid_json"] == 1
    assert counts["missing_text_field"] == 2
    assert counts["invalid_unicode"] == 1
    assert counts["line_too_long"] == 1
    logged = [json.loads(line) for line in (tmp_path / "out" / "issues.jsonl").read_text().splitlines()]
    where = {(i["kind"], Path(i["file"]).name, i["line"]) for i in logged}
    for expected in [("invalid_utf8", "bad.txt", 3), ("control_characters", "bad.txt", 4),
                     ("control_characters", "bad.txt", 6), ("empty_document", "bad.txt", 6),
                     ("nfkc_normalized", "bad.txt", 8), ("emoji", "bad.txt", 9), ("invalid_json", "bad.jsonl", 2),
                     ("missing_text_field", "bad.jsonl", 4), ("invalid_unicode", "bad.jsonl", 5),
                     ("missing_text_field", "bad.jsonl", 6), ("line_too_long", "bad.jsonl", 7)]:
        assert expected in where, (expected, sorted(where))
    manifest = read_manifest(tmp_path / "out")
    assert manifest["issues"] == {k: counts.get(k, 0) for k in manifest["issues"]}
    assert manifest["totals"]["num_documents"] == 3 + 2  # text: docs 1, 2, 4; JSON lines: lines 1 and 5
    assert "bad.txt:3" in report.summary()


def test_long_document_is_read_in_bounded_pieces(tmp_path, tok_dir, tokenizer):
    doc = "".join(sample_documents()[:20]).replace("\n", "")  # about 6,000 characters on ONE line
    (tmp_path / "long.txt").write_text("前の文書。\n\n" + doc + "\n\n後の文書。\n", encoding="utf-8")
    opts = PrepareOptions(source=SourceOptions(piece_bytes=512))
    report = prepare(tok_dir, [tmp_path / "long.txt"], tmp_path / "out", seq_len=128, num_workers=0,
                     progress=False, options=opts)
    assert report.issue_counts["long_document_split"] == 1
    docs = _documents_of(_all_tokens(tmp_path / "out"))
    assert len(docs) == 3  # still one document, continuing over many sequences
    assert docs[0] == _encode(tokenizer, "前の文書。") and docs[2] == _encode(tokenizer, "後の文書。")
    # Pieces are cut after "。", where this tokenizer splits anyway: the ids equal whole-document tokenisation.
    assert docs[1] == _encode(tokenizer, doc)


def test_uint32_shards_for_a_large_vocabulary(tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = "".join(sample_documents()[:3]).replace("\n", "")
    chars = sorted(set(text))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"filler{i}": i for i in range(5, 70000)})
    vocab.update({c: 70000 + i for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    prepare(tmp_path / "tok", [tmp_path / "t.txt"], tmp_path / "out", seq_len=64, num_workers=0, progress=False,
            options=PrepareOptions(cleaning=CleaningOptions(normalization=None)))
    assert token_dtype(65536).itemsize == 2 and token_dtype(65537).itemsize == 4
    assert read_manifest(tmp_path / "out")["dtype"] == "uint32"
    ds = PackedDataset(tmp_path / "out", shuffle=False)
    ids = ds.sample(0)
    assert ids[0] == CLS and ids[1] == vocab[text[0]] >= 65536


def test_tokenizer_fingerprint_and_mismatch(prepared, tok_dir, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    fp = tokenizer_fingerprint(tok_dir)
    assert fp == tokenizer_fingerprint(tokenizer) and fp.startswith("sha256:")
    # transformers rewrites the backend's truncation/padding on calls: that must not change the fingerprint.
    copy = AutoTokenizer.from_pretrained(str(tok_dir))
    copy(["今日は"] * 2, truncation=True, max_length=4, padding="max_length")
    assert tokenizer_fingerprint(copy) == fp
    assert check_tokenizer(prepared, copy) == fp
    other = _train_tokenizer(tmp_path / "other", 1100)
    assert tokenizer_fingerprint(other) != fp
    with pytest.raises(TokenizerMismatchError, match="does not match"):
        check_tokenizer(prepared, other)
    with pytest.raises(TokenizerMismatchError):
        PackedDataset(prepared, tokenizer=AutoTokenizer.from_pretrained(str(other)))


def test_cli_prepare(tmp_path, tok_dir, capsys):
    from bigbird_ja.cli import main

    out = tmp_path / "cli"
    assert main(["prepare", "--tokenizer", str(tok_dir), "--input", str(sample_corpus_path()), "--out", str(out),
                 "--seq-len", "128", "--num-workers", "1", "--no-progress"]) == 0
    assert "prepared 50 documents" in capsys.readouterr().out
    assert main(["prepare", "--tokenizer", str(tok_dir), "--input", str(tmp_path / "missing.txt"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 100, 1000, 4097])
def test_feistel_is_a_permutation(n):
    perm = FeistelPermutation(n, key=12345)
    values = perm(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    if n >= 100:
        assert (values != np.arange(n)).mean() > 0.9
        assert not np.array_equal(values, FeistelPermutation(n, key=12346)(np.arange(n)))


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_loader_yields_samples_and_shuffles_by_epoch(prepared):
    ds = PackedDataset(prepared, num_epochs=2)
    n = ds.num_samples
    items = list(ds)
    assert len(items) == 2 * n
    first = [it["index"] for it in items[:n]]
    second = [it["index"] for it in items[n:]]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second and first != list(range(n))
    assert [it["position"] for it in items] == list(range(2 * n))
    rows = _all_tokens(prepared)
    for it in items[:5]:
        assert it["input_ids"].dtype == torch.long and it["input_ids"].shape == (64,)
        assert it["input_ids"].tolist() == rows[it["index"]].tolist()
    assert ds.state_dict()["epoch"] == 2 and ds.state_dict()["consumed_in_epoch"] == 0
    assert [it["index"] for it in PackedDataset(prepared, shuffle=False, num_epochs=1)] == list(range(n))


def test_resume_reproduces_the_uninterrupted_batches(prepared, tokenizer):
    def loader(ds):
        collator = MLMCollator.from_tokenizer(tokenizer, seed=7)
        return iter(DataLoader(ds, batch_size=4, collate_fn=collator, num_workers=0))

    reference = [next(b) for b in [loader(PackedDataset(prepared, seed=11))] for _ in range(10)]
    ds = PackedDataset(prepared, seed=11)
    batches = loader(ds)
    for _ in range(4):
        next(batches)
    state = json.loads(json.dumps(ds.state_dict()))  # as a checkpoint would store it
    assert state["global_position"] == 16
    resumed = PackedDataset(prepared)  # default seed: the state's seed takes over
    resumed.load_state_dict(state)
    again = loader(resumed)
    for expected in reference[4:]:
        got = next(again)
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(got[key], expected[key]), key


def _run_ranks(data_dir, world_size, samples_per_rank, state=None, num_epochs=1):
    """Each rank takes ``samples_per_rank`` samples (None: to the end); returns indices and rank 0's state."""
    taken, states = [], []
    for rank in range(world_size):
        ds = PackedDataset(data_dir, seed=5, rank=rank, world_size=world_size, num_epochs=num_epochs)
        if state is not None:
            ds.load_state_dict(state)
        items = list(ds) if samples_per_rank is None else _take(ds, samples_per_rank)
        taken.extend(it["index"] for it in items)
        states.append(ds.state_dict())
    if samples_per_rank is not None:
        assert all(s == states[0] for s in states)  # lockstep ranks agree on the cursor
    return taken, states[0]


@pytest.mark.parametrize("before, after", [(2, 3), (2, 1), (3, 2), (1, 4)])
def test_every_sample_once_per_epoch_across_ranks_and_resizes(prepared, before, after):
    n = PackedDataset(prepared).num_samples
    full, _ = _run_ranks(prepared, before, None)
    assert sorted(full) == list(range(n))
    first, state = _run_ranks(prepared, before, 3)
    assert state["consumed_in_epoch"] == 3 * before
    rest, _ = _run_ranks(prepared, after, None, state=state)
    assert sorted(first + rest) == list(range(n))


def test_drop_last_ends_ranks_evenly(prepared):
    n = PackedDataset(prepared).num_samples
    counts = [len(list(PackedDataset(prepared, rank=r, world_size=4, num_epochs=1, drop_last=True)))
              for r in range(4)]
    assert len(set(counts)) == 1 and counts[0] == n // 4


def test_dataloader_workers_are_refused(prepared):
    batches = iter(DataLoader(PackedDataset(prepared), batch_size=2, num_workers=1))
    try:
        with pytest.raises(RuntimeError, match="num_workers=0"):
            next(batches)
    finally:
        batches._shutdown_workers()  # else the worker lingers until garbage collection (5 s in a later test)


def test_state_from_other_data_is_refused(prepared, tmp_path, tok_dir, corpus_dir):
    prepare(tok_dir, [corpus_dir / "b.txt"], tmp_path / "b", seq_len=64, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="other data"):
        PackedDataset(tmp_path / "b").load_state_dict(PackedDataset(prepared).state_dict())


def test_open_descriptors_stay_constant_with_200_shards(tmp_path, tok_dir, corpus_dir):
    out = tmp_path / "many"
    report = prepare(tok_dir, [corpus_dir / "a.txt", corpus_dir / "b.txt"], out, seq_len=16, shard_tokens=32,
                     num_workers=2, progress=False, options=PrepareOptions(durable=False))  # no fsync: 4 ms each
    assert report.num_shards >= 200
    base = _fd_count()
    # Touch 20 shards, then all of them: the descriptor count is the same, at most max_open_shards.
    few = PackedDataset(out, max_open_shards=4, shuffle=False, num_epochs=1)
    _take(few, 40)
    after_few = _fd_count()
    few.close()
    ds = PackedDataset(out, max_open_shards=4, num_epochs=1)
    peak = 0
    for _ in ds:
        peak = max(peak, _fd_count())
    assert peak - base <= 4 and after_few - base <= 4
    assert _fd_count() == after_few
    ds.close()
    assert _fd_count() == base


# ---------------------------------------------------------------------------------------------------------------
# masking


def _collator(vocab=1000, **opts):
    return MLMCollator(vocab_size=vocab, mask_token_id=MASK, pad_token_id=PAD, special_token_ids=range(5),
                       options=MaskingOptions(**opts), seed=0)


def _random_rows(n, length, vocab=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(5, vocab, (n, length), generator=gen)
    rows[:, 0] = CLS
    rows[:, length // 2] = SEP
    rows[:, -7:] = PAD
    return rows


@pytest.mark.parametrize("max_span", [1, 10])
def test_mask_rate_specials_and_80_10_10(max_span):
    rows = _random_rows(16, 1024)
    collator = _collator(max_span=max_span)
    state = torch.get_rng_state()
    batch = collator([{"input_ids": r} for r in rows])
    assert torch.equal(state, torch.get_rng_state())  # no global RNG
    labels, ids = batch["labels"], batch["input_ids"]
    chosen = labels != IGNORE_INDEX
    special = rows < 5
    assert not chosen[special].any()
    assert torch.equal(ids[special], rows[special])
    assert torch.equal(labels[chosen], rows[chosen])
    assert torch.equal(batch["attention_mask"], (rows != PAD).long())
    rate = chosen.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.005, rate
    n = chosen.sum().item()
    masked = (ids[chosen] == MASK).sum().item() / n
    kept = (ids[chosen] == rows[chosen]).sum().item() / n
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.02 and abs(1 - masked - kept - 0.1) < 0.02
    assert ids[chosen].min() >= 4  # random replacements are never special
    # Spans: runs of consecutive chosen tokens are longer with max_span 10.
    runs = [len(run) for row in chosen.tolist() for run in "".join("x" if c else " " for c in row).split()]
    mean_run = sum(runs) / len(runs)
    assert (mean_run < 1.3) if max_span == 1 else (mean_run > 2.5), mean_run


def test_masks_are_deterministic_from_seed_and_position():
    rows = _random_rows(4, 256)
    feats = [{"input_ids": r, "position": 100 + i} for i, r in enumerate(rows)]
    a, b = _collator()(feats), _collator()(feats)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    # Masks depend on a sample's position, not on its batch neighbours.
    alone = _collator()(feats[2:3])
    assert torch.equal(alone["labels"][0], a["labels"][2])
    other = MLMCollator(vocab_size=1000, mask_token_id=MASK, pad_token_id=PAD, special_token_ids=range(5), seed=1)
    assert not torch.equal(other(feats)["labels"], a["labels"])
    # Without positions: the collator's own generator, restorable.
    plain = _collator()
    plain([r for r in rows])
    saved = plain.state_dict()
    x = plain([r for r in rows])
    plain.load_state_dict(saved)
    assert torch.equal(plain([r for r in rows])["labels"], x["labels"])


# ---------------------------------------------------------------------------------------------------------------
# fuzz


def _random_string(rng: random.Random) -> str:
    pools = [
        (0x3041, 0x3096), (0x30A1, 0x30FA), (0x4E00, 0x4FFF), (0x20, 0x7E), (0xFF01, 0xFF5E), (0xFF61, 0xFF9F),
        (0x1F300, 0x1F64F), (0x0, 0x1F), (0x7F, 0x9F), (0x2000, 0x206F), (0x0300, 0x036F), (0xAC00, 0xAC50),
    ]
    out = []
    for _ in range(rng.randint(0, 60)):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_fuzz_prepare_and_collator(tmp_path, tok_dir, tokenizer):
    rng = random.Random(1234)
    blobs = []
    for i in range(3000):
        s = _random_string(rng).encode("utf-8")
        if i % 7 == 0:  # invalid UTF-8: random bytes, lone surrogates, truncated sequences
            s += bytes(rng.randint(0x80, 0xFF) for _ in range(rng.randint(1, 5)))
            s += "\ud800".encode("utf-8", "surrogatepass") + "字".encode()[:2]
        blobs.append(s)
    blobs.append(("長い行" * 40000).encode())  # a 360 kB line
    (tmp_path / "fuzz.txt").write_bytes(b"\n".join(b + (b"\n" if i % 3 == 0 else b"") for i, b in enumerate(blobs)))
    with open(tmp_path / "fuzz.jsonl", "w", encoding="utf-8") as f:
        for i in range(1500):
            text = _random_string(rng) + ("\ud83d" if i % 50 == 0 else "")
            f.write(json.dumps({"text": text}, ensure_ascii=i % 2 == 0) + "\n")
    with open(tmp_path / "fuzz.jsonl", "ab") as f:
        f.write(b'{"text": "\xff\xfe"}\n{"text": [1, 2]}\nnot json\n')
    # Every 7th line is invalid on purpose, far above the share that refuses a file by default (1%).
    opts = PrepareOptions(source=SourceOptions(piece_bytes=4096), chunk_bytes=8192,
                          cleaning=CleaningOptions(max_invalid_fraction=1.0))
    report = prepare(tok_dir, [tmp_path / "fuzz.txt", tmp_path / "fuzz.jsonl"], tmp_path / "out", seq_len=128,
                     num_workers=2, progress=False, options=opts)
    totals = read_manifest(tmp_path / "out")["totals"]
    assert totals["num_tokens"] == totals["num_document_tokens"] + totals["num_separator_tokens"] + \
        totals["num_cls_tokens"] + totals["num_padding_tokens"]
    assert report.issue_counts["invalid_utf8"] > 0 and report.issue_counts["control_characters"] > 0
    ds = PackedDataset(tmp_path / "out", num_epochs=1)
    collator = MLMCollator.from_tokenizer(tokenizer)
    for batch in DataLoader(ds, batch_size=16, collate_fn=collator):
        assert batch["input_ids"].shape[1] == 128
    fuzz_rows = [torch.randint(0, len(tokenizer), (rng.randint(1, 50),)) for _ in range(500)]
    for i in range(0, 500, 25):
        collator(fuzz_rows[i:i + 25])
