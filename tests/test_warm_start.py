"""The warm-start route (issue 29): a DeBERTa-v3-shaped checkpoint with its own SentencePiece tokenizer, converted,
lengthened, pretrained further on its own tokenizer's data, exported and fine-tuned, with no trap on the way.

Lengthening keeps the function: the relative-position range and the random blocks' span are pinned in config.json,
at load time for folders saved before they were, by `extend_length` and by `bigbird-ja convert --max-length`. The
source here is shaped like DeBERTa-v3 (relative positions, log buckets, share_att_key, a [MASK] added after the
SentencePiece pieces, more embeddings than tokens) at toy sizes; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM

import bigbird_ja
from bigbird_ja.cli import main as cli_main
from bigbird_ja.convert import ConversionError, convert_checkpoint
from bigbird_ja.training.config import ConfigError, load_pretrain_config
from conftest import randomize_

REPO = Path(__file__).resolve().parents[1]
JSQUAD = REPO.parent / "shared" / "data" / "jglue" / "jsquad-v1.3" / "valid-v1.3.json"
SPM_PIECES = 1200  # SentencePiece pieces; [MASK] is added after them (id 1200), as in DeBERTa-v3
PADDED_VOCAB = 1280  # embeddings: more rows than tokens, as DeBERTa-v3's 128,100 for 128,001


def small_config(**overrides) -> bigbird_ja.BigBirdJaConfig:
    """One layer, 500-token inputs of blocks of 16 at a 512-token length: cheap at 16,384 tokens too."""
    values = dict(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                  max_position_embeddings=512, position_buckets=16, block_size=16, num_window_blocks=3,
                  num_global_blocks=1, num_random_blocks=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, attention_backend="blocked")
    values.update(overrides)
    return bigbird_ja.BigBirdJaConfig(**values)


def _saved_512(folder: Path, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """A random model saved at 512 tokens, a 500-token input and the model's output on it."""
    model = randomize_(bigbird_ja.BigBirdJaModel(small_config(**overrides)), seed=1).eval()
    model.save_pretrained(folder)
    ids = torch.randint(1, 101, (1, 500), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return ids, model(ids).last_hidden_state


def _forget_pinned_fields(folder: Path) -> None:
    """config.json as saved before the length-defined fields were written resolved."""
    path = folder / "config.json"
    saved = json.loads(path.read_text())
    for key in ("max_relative_positions", "random_block_span"):
        saved.pop(key, None)
    path.write_text(json.dumps(saved))
    (folder / "checksums.json").unlink(missing_ok=True)


def _max_error(model, ids, expected) -> float:
    with torch.no_grad():
        error = (model(ids).last_hidden_state - expected).abs().max().item()
    print(f"max |lengthened - saved| = {error:.2e}")
    return error


# ----------------------------------------------------------------------------------------------------------------
# Safe lengthening


def test_a_512_token_model_lengthened_to_4096_and_16384_keeps_its_outputs_and_runs_there(tmp_path):
    ids, expected = _saved_512(tmp_path / "m512")
    saved = json.loads((tmp_path / "m512" / "config.json").read_text())
    assert (saved["max_relative_positions"], saved["random_block_span"]) == (512, 512)  # pinned where they follow
    for length in (4096, 16384):
        model = AutoModel.from_pretrained(tmp_path / "m512", max_position_embeddings=length).eval()
        assert model.config.max_position_embeddings == length
        assert _max_error(model, ids, expected) <= 1e-6
    # the documented call, then a save and a load: the same function at the new length
    model = bigbird_ja.BigBirdJaModel.from_pretrained(tmp_path / "m512").eval().extend_length(16384)
    assert _max_error(model, ids, expected) <= 1e-6
    model.save_pretrained(tmp_path / "m16k")
    again = AutoModel.from_pretrained(tmp_path / "m16k").eval()
    assert again.config.max_position_embeddings == 16384 and _max_error(again, ids, expected) <= 1e-6
    with torch.no_grad():  # and it reads the new length
        long = again(torch.randint(1, 101, (1, 16384), generator=torch.Generator().manual_seed(3))).last_hidden_state
    assert long.shape == (1, 16384, 32) and torch.isfinite(long).all()


def test_a_folder_saved_without_the_pinned_fields_loads_as_before_and_lengthens_safely(tmp_path):
    """Back-compat: a config.json from before keeps its outputs; raising its length at load time pins them there."""
    ids, expected = _saved_512(tmp_path / "old")
    _forget_pinned_fields(tmp_path / "old")
    assert _max_error(AutoModel.from_pretrained(tmp_path / "old").eval(), ids, expected) <= 1e-6
    for load in (AutoModel.from_pretrained, bigbird_ja.BigBirdJaModel.from_pretrained):
        model = load(tmp_path / "old", max_position_embeddings=4096).eval()
        assert (model.config.max_relative_positions, model.config.random_block_span) == (512, 512)
        assert _max_error(model, ids, expected) <= 1e-6
    from bigbird_ja.configuration import build_model_config

    config = build_model_config(tmp_path / "old", {"max_position_embeddings": 4096})  # pretraining's builder
    assert (config.max_relative_positions, config.random_block_span) == (512, 512)


def test_an_explicit_change_of_a_pinned_field_is_warned_about_with_the_fix(tmp_path):
    ids, expected = _saved_512(tmp_path / "m512")
    config = bigbird_ja.BigBirdJaConfig.from_pretrained(tmp_path / "m512")
    config.max_position_embeddings, config.random_block_span = 4096, 4096
    with pytest.warns(UserWarning, match=r"random_block_span=4096 \(saved: 512\).*leave these fields as saved"):
        model = AutoModel.from_pretrained(tmp_path / "m512", config=config).eval()
    assert _max_error(model, ids, expected) > 1e-3  # the warning was right: it computes something else


def test_absolute_position_embeddings_cannot_be_lengthened(tmp_path):
    _saved_512(tmp_path / "abs", position_biased_input=True)
    model = bigbird_ja.BigBirdJaModel.from_pretrained(tmp_path / "abs")
    with pytest.raises(ValueError, match="absolute position embeddings .*cannot be made longer"):
        model.extend_length(1024)
    assert model.config.max_position_embeddings == 512  # unchanged by the refusal
    with pytest.raises(ConversionError, match="absolute position embeddings"):
        convert_checkpoint(tmp_path / "abs", tmp_path / "abs-1024", max_length=1024)


def test_convert_lengthens_a_bigbird_ja_folder_with_its_tokenizer_into_a_readable_folder(tmp_path):
    ids, expected = _saved_512(tmp_path / "m512")
    (tmp_path / "m512" / "spm.model").write_bytes(b"not read here")
    assert cli_main(["convert", str(tmp_path / "m512"), str(tmp_path / "m4096"), "--max-length", "4096"]) == 0
    model = AutoModel.from_pretrained(tmp_path / "m4096").eval()
    assert model.config.max_position_embeddings == 4096 and _max_error(model, ids, expected) <= 1e-6
    assert (tmp_path / "m4096" / "spm.model").read_bytes() == b"not read here"
    report = json.loads((tmp_path / "m4096" / "conversion_report.json").read_text())
    assert report["config_changes"] == {"max_position_embeddings": 4096}
    mode = stat.S_IMODE((tmp_path / "m4096").stat().st_mode)
    assert mode & 0o055 == 0o055 & ~_umask(), oct(mode)  # not mkdtemp's private 0700
    with pytest.raises(ConversionError, match=r"only --max-length applies.*block_size"):
        convert_checkpoint(tmp_path / "m512", tmp_path / "x", max_length=4096, block_size=32)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------------------------
# A DeBERTa-v3-shaped source: SentencePiece only, [MASK] appended, padded embeddings


def _train_spm(out: Path) -> None:
    import sentencepiece

    from bigbird_ja.data import sample_corpus_path

    lines = [x for x in sample_corpus_path().read_text(encoding="utf-8").splitlines() if x.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=SPM_PIECES, model_type="unigram",
        character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
        eos_piece="[SEP]", unk_piece="[UNK]", num_threads=1, minloglevel=2)
    (out / "spm.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DebertaV2Tokenizer", "vocab_type": "spm", "do_lower_case": False, "split_by_punct": False,
        "bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "cls_token": "[CLS]", "mask_token": "[MASK]"}))


@pytest.fixture(scope="module")
def deberta_v3_source(tmp_path_factory) -> Path:
    """DebertaV2ForMaskedLM shaped like DeBERTa-v3 (no dropout, so a step's loss is a function of the weights),
    with only spm.model + tokenizer_config.json beside it."""
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    out = tmp_path_factory.mktemp("deberta-v3-ja")
    _train_spm(out)
    config = DebertaV2Config(
        vocab_size=PADDED_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, relative_attention=True, position_buckets=32, max_relative_positions=-1,
        pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
        type_vocab_size=0, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    source = DebertaV2ForMaskedLM(config)
    with torch.no_grad():  # small logits: a loss near ln(vocab), far from any degenerate value
        for name, param in source.named_parameters():
            if not name.endswith("LayerNorm.weight"):
                param.normal_(0.0, 0.05)
    source.save_pretrained(out)
    assert not (out / "tokenizer.json").exists()
    return out


@pytest.fixture(scope="module")
def converted(deberta_v3_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "bigbird-ja-512"
    convert_checkpoint(deberta_v3_source, out)
    return out


def test_a_spm_only_source_converts_and_its_tokenizer_loads_with_the_padded_vocabulary(converted):
    from transformers import AutoTokenizer

    from bigbird_ja.data.fingerprint import load_tokenizer

    assert (converted / "spm.model").is_file() and not (converted / "tokenizer.json").exists()
    tokenizer = load_tokenizer(converted)  # a fast tokenizer, built from spm.model
    assert len(tokenizer) == SPM_PIECES + 1 and tokenizer.mask_token_id == SPM_PIECES
    config = bigbird_ja.BigBirdJaConfig.from_pretrained(converted)
    assert config.vocab_size == PADDED_VOCAB and config.max_relative_positions == 512
    assert isinstance(AutoTokenizer.from_pretrained(converted), type(tokenizer))


def test_init_from_defines_the_model_and_a_preset_beside_it_is_left_out_with_a_note(converted):
    from bigbird_ja.training.trainer import resolve_model_config

    notes = []
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [f"--model.init_from={converted}"],
                               log=notes.append)
    assert cfg.model.preset is None and cfg.model.overrides == {}
    assert len(notes) == 1 and "configs/model/tiny-cpu.yaml" in notes[0] and "max_position_embeddings" in notes[0]
    config = resolve_model_config(cfg, vocab_size=SPM_PIECES + 1, seq_len=512)
    saved = bigbird_ja.BigBirdJaConfig.from_pretrained(converted)
    assert config.to_dict() == saved.to_dict()  # heads, block size, dropout, relative range: the checkpoint's
    assert config.vocab_size == PADDED_VOCAB  # not forced to the tokenizer's 1,201

    # a longer length from the command line keeps the function; a weight's shape cannot change
    longer = resolve_model_config(load_pretrain_config(
        REPO / "configs/pretrain/tiny-cpu.yaml", [f"--model.init_from={converted}",
                                                  "--model.overrides.max_position_embeddings=2048"], log=notes.append),
        vocab_size=SPM_PIECES + 1, seq_len=2048)
    assert (longer.max_position_embeddings, longer.max_relative_positions, longer.random_block_span) == \
        (2048, 512, 512)
    with pytest.raises(ConfigError, match=r"\['num_attention_heads'\] would change the shapes"):
        resolve_model_config(load_pretrain_config(None, [f"--model.init_from={converted}",
                                                         "--model.overrides.num_attention_heads=4"]), 1201, 512)
    with pytest.raises(ConfigError, match=r"below the data's seq_len=1024; lengthen the checkpoint first "
                                          r"\(`bigbird-ja convert .* --max-length 1024`\)"):
        resolve_model_config(cfg, vocab_size=SPM_PIECES + 1, seq_len=1024)
    with pytest.raises(ConfigError, match=r"has only 1280 embeddings"):
        resolve_model_config(cfg, vocab_size=2000, seq_len=512)
    # both in one place: refused, naming the fix
    with pytest.raises(ConfigError, match=r"both given.*--model.preset=null"):
        load_pretrain_config(None, [f"--model.init_from={converted}", "--model.preset=configs/model/tiny-cpu.yaml"])


def _prepare(tokenizer, out: Path, seq_len: int = 512) -> Path:
    from bigbird_ja.data import prepare, sample_corpus_path

    prepare(tokenizer, [sample_corpus_path()], out, seq_len=seq_len, num_workers=0, shard_tokens=seq_len * 4,
            progress=False)
    return out


def test_data_of_another_tokenizer_is_refused_at_preflight_naming_the_fix(converted, tmp_path):
    from bigbird_ja.data import sample_corpus_path
    from bigbird_ja.data.fingerprint import load_tokenizer
    from bigbird_ja.tokenization import train_tokenizer
    from bigbird_ja.training.preflight import run_preflight

    train_tokenizer([sample_corpus_path()], tmp_path / "own", SPM_PIECES + 1, pretokenize="none",
                    shrink_vocab=True)
    other = load_tokenizer(tmp_path / "own")
    data = _prepare(other, tmp_path / "data")

    def preflight(tokenizer_dir, tokenizer):
        cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
            f"--model.init_from={converted}", f"--data.dir={data}", f"--data.tokenizer={tokenizer_dir}",
            f"--run.output_dir={tmp_path / 'run'}", "--prepare.seq_len=512", "--data.eval_shards=1"])
        return run_preflight(cfg, rank=0, world_size=1, num_nodes=1, tokenizer=tokenizer).problems

    problems = preflight(tmp_path / "own", other)
    assert len(problems) == 1, problems
    assert re.search(rf"is not the tokenizer of model.init_from=.*`bigbird-ja prepare --tokenizer "
                     rf"{re.escape(str(converted))} ", problems[0]), problems[0]
    # the checkpoint's own tokenizer, whose data this is not: the manifest's fingerprint says so
    assert any("does not match" in p for p in preflight(converted, load_tokenizer(converted)))


def test_a_warm_start_trains_no_tokenizer_and_writes_nothing_into_the_model_folder(converted, tmp_path):
    from bigbird_ja.training.trainer import ensure_data

    before = sorted(p.name for p in converted.iterdir())
    base = [f"--model.init_from={converted}", "--prepare.seq_len=512", "--prepare.shard_tokens=2048"]
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
        *base, f"--data.dir={tmp_path / 'data'}", f"--data.tokenizer={tmp_path / 'nothing'}"])
    with pytest.raises(ValueError, match=rf"trains none.*--data.tokenizer={converted}"):
        ensure_data(cfg)
    assert not (tmp_path / "nothing").exists()
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
        *base, f"--data.dir={converted / 'data'}", f"--data.tokenizer={converted}"])
    with pytest.raises(ValueError, match=r"data.dir=.* lies inside model.init_from"):
        ensure_data(cfg)
    # the spm-only folder as the data's tokenizer: prepared with it, nothing written beside it
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
        *base, f"--data.dir={tmp_path / 'data'}", f"--data.tokenizer={converted}"])
    ensure_data(cfg)
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["vocab_size"] == SPM_PIECES + 1
    assert sorted(p.name for p in converted.iterdir()) == before


# ----------------------------------------------------------------------------------------------------------------
# The route end to end, as docs/warm-start.md writes it


def _route() -> list[list[str]]:
    text = (REPO / "docs" / "warm-start.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("bigbird-ja ")]


def _first_loss(folder: Path, data: Path, cfg) -> float:
    """The converted model's loss on the batch the run's first step reads (its stream and masks)."""
    from bigbird_ja.data import MLMCollator, PackedDataset
    from bigbird_ja.data.fingerprint import load_tokenizer

    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    shards = len(json.loads((data / "manifest.json").read_text())["shards"])
    stream = iter(PackedDataset(data, seed=cfg.data.shuffle_seed, rank=0, world_size=1, shuffle=True,
                                shards=list(range(shards - cfg.data.eval_shards)) if cfg.data.eval_shards else None))
    collator = MLMCollator.from_tokenizer(load_tokenizer(folder), options=cfg.masking.options(),
                                          seed=cfg.masking.seed)
    batch = collator([next(stream) for _ in range(cfg.batch.micro_batch_size)])
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.slow
@pytest.mark.skipif(not JSQUAD.is_file(), reason=f"JGLUE data not found at {JSQUAD} (shared/ is laid beside the "
                    f"repository)")
def test_the_documented_warm_start_route_runs_end_to_end(deberta_v3_source, tmp_path, monkeypatch, capsys):
    """convert -> lengthen -> prepare -> pretrain (first loss = the converted model's) -> export -> finetune jsquad."""
    route = _route()
    assert [args[0] for args in route] == ["convert", "convert", "prepare", "pretrain", "export", "finetune"]
    monkeypatch.chdir(REPO)  # the presets' relative paths
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    names = {"deberta-v3-ja": deberta_v3_source}
    for name in ("bigbird-ja-512", "bigbird-ja-4096", "data/warm-4096", "runs/warm-4096",
                 "bigbird-ja-4096-pretrained", "runs/jsquad-warm-4096"):
        names[name] = tmp_path / name
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    from bigbird_ja.data import sample_corpus_path

    (corpus / "ja.txt").write_text(sample_corpus_path().read_text(encoding="utf-8") * 3, encoding="utf-8")
    names["corpus/"] = corpus
    sizes = {"4096": "1024", "configs/pretrain/base-4096-1node.yaml": "configs/pretrain/tiny-cpu.yaml",
             "configs/finetune/jsquad-long-4096.yaml": "configs/finetune/jsquad-tiny-cpu.yaml"}
    tiny = {  # sizes only: the route's own arguments stay as written
        "prepare": ["--shard-tokens", "4096", "--num-workers", "0", "--no-progress"],
        "pretrain": ["--prepare.seq_len=1024", "--data.eval_shards=0", "--batch.micro_batch_size=2",
                     "--batch.global_batch_size=2", "--train.max_steps=2", "--optim.warmup_steps=1",
                     "--checkpoint.every_steps=2", "--log.every_steps=1",
                     "--log.progress_bar=false", "--log.tensorboard=false"],
        "finetune": [f"--data.train={JSQUAD}", f"--data.valid={JSQUAD}", "--data.valid_articles=3:4",
                     "--data.max_train_examples=8", "--train.max_steps=2", "--train.batch_size=2",
                     "--train.progress_bar=false", "--train.log_every_steps=1", "--eval.batch_size=8"],
    }

    def substituted(word: str) -> str:
        word = names.get(word, word)
        if isinstance(word, Path):
            return str(word)
        for key, value in names.items():
            if word.endswith("=" + key):
                return word[: -len(key)] + str(value)
        return sizes.get(word, word)

    first_loss = None
    for args in route:
        args = [substituted(word) for word in args] + tiny.get(args[0], [])
        if args[0] == "pretrain":
            cfg = load_pretrain_config(args[args.index("--config") + 1],
                                       [a for a in args[1:] if a.startswith("--") and a != "--config"])
            first_loss = _first_loss(names["bigbird-ja-4096"], names["data/warm-4096"], cfg)
            model_files = {p.name: p.stat().st_mtime_ns for p in names["bigbird-ja-4096"].iterdir()}
        assert cli_main(args) == 0, args
        if args[0] == "pretrain":  # read, never written
            assert {p.name: p.stat().st_mtime_ns for p in names["bigbird-ja-4096"].iterdir()} == model_files
    printed = capsys.readouterr()
    assert "the run preset's model.preset='configs/model/tiny-cpu.yaml'" in printed.err  # the note, once

    config = json.loads((names["bigbird-ja-4096"] / "config.json").read_text())
    assert (config["max_position_embeddings"], config["max_relative_positions"], config["random_block_span"],
            config["vocab_size"]) == (1024, 512, 512, PADDED_VOCAB)
    metrics = [json.loads(x) for x in (names["runs/warm-4096"] / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["loss"] for r in metrics if r["event"] == "train" and r["step"] == 1)
    print(f"first step loss {logged:.6f}, converted model on the same batch {first_loss:.6f}")
    assert abs(logged - first_loss) < 1e-4
    exported = names["bigbird-ja-4096-pretrained"]
    assert bigbird_ja.BigBirdJaConfig.from_pretrained(exported).vocab_size == PADDED_VOCAB
    finetuned = names["runs/jsquad-warm-4096"]
    metrics = json.loads((finetuned / "metrics.json").read_text())
    predictions = json.loads((finetuned / "predictions.json").read_text())
    assert metrics["total"] == len(predictions) > 0
    assert bigbird_ja.BigBirdJaConfig.from_pretrained(finetuned / "model").vocab_size == PADDED_VOCAB


def _commands(block: str) -> list[list[str]]:
    """The `bigbird-ja ...` commands of a bash block, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True)[1:] for line in joined.splitlines() if line.startswith("bigbird-ja ")]


def test_the_readmes_warm_start_route_is_the_one_the_end_to_end_test_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Warm start and lengthening"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    docs = re.search(r"```bash\n(.*?)```", (REPO / "docs" / "warm-start.md").read_text(encoding="utf-8"), re.S)
    assert _commands(block) == _commands(docs.group(1)) == _route()
    assert [c[0] for c in _route()] == ["convert", "convert", "prepare", "pretrain", "export", "finetune"]
