"""A generated long-range QA task: find the value stated next to a key, far from the question.

Each document is a run of filler words with `num_facts` facts "kK vV" (a key word followed by its value word)
at random places; the keys of one document are distinct. The question names one of the keys ("kK ... kK ?", the
key `question_repeats` times) and the
answer is the value word after it. Every fact of a long document lies at or beyond input position
`min_answer_position`, so a model given only the first `min_answer_position` tokens never sees any fact: its exact
match can only be chance (below 1 / num_values; in practice 0), while the sparse model sees the question in its
global blocks from every block of the document. The other facts are distractors: the answer depends on the
question, not on spotting the one fact (a task where only a single fact is present is solvable without reading
the question at all).

The files are SQuAD v1.1 JSON (one paragraph per document, one question per paragraph), so the task runs through
exactly the code of long-document JSQuAD: windowing, labels from character offsets, prediction, the JGLUE metric.

Why the task looks the way it does (measured while tuning configs/finetune/longrange-1024.yaml on 2 CPU cores):
a small transformer trained from scratch learns "the value after a key" at once, but matching the key with the
question only after a plateau where the loss sits at log(num_facts): it picks one fact at random. With the key
stated once in the question and 8 keys, the plateau outlasted 3,000 steps; three things bring it within CI time:
four keys (`num_keys`), the key stated `question_repeats` = 28 times so it fills the 32-token global block (every
document block attends to it with real weight from the start), and a curriculum: a share `short_fraction` of the
training documents is short (`short_seq_len` = 128 tokens, facts anywhere), where a step costs ~0.04 s instead of
~0.45 s, and the model learns the matching there (2,400 short steps cover the plateaus seen over 4 seeds). The
full-length documents, last, teach it to look far; the transfer is natural with block-sparse attention, where every
query block sees the same number of key blocks at any length and every distance beyond `max_relative_positions`
shares one relative-position bucket.

The vocabulary is tiny (specials, filler words w0.., keys k0.., values v0.., "?") and the tokenizer is word-level
(`tokenizers` WordLevel over whitespace), saved so that `AutoTokenizer.from_pretrained` loads it with the same
special-token ids and [CLS] A [SEP] B [SEP] template as the project's Japanese tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..tokenization import CLS_ID, SEP_ID, SPECIAL_TOKENS
from .config import SyntheticSection

QUESTION_MARK = "?"


def question_tokens(spec: SyntheticSection) -> int:
    """Tokens before the document: [CLS], the key question_repeats times, "?", [SEP]."""
    return spec.question_repeats + 3


def vocabulary(spec: SyntheticSection) -> list[str]:
    """Every word of the task, after the special tokens (ids in this order)."""
    return ([f"w{i}" for i in range(spec.num_filler_words)] + [f"k{i}" for i in range(spec.num_keys)]
            + [f"v{i}" for i in range(spec.num_values)] + [QUESTION_MARK])


def build_word_tokenizer(spec: SyntheticSection, out_dir: str | Path):
    """A word-level fast tokenizer of the task's vocabulary, saved to `out_dir`; returns the transformers one."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    vocab = dict(SPECIAL_TOKENS)
    for word in vocabulary(spec):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf = TokenizersBackend(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                           sep_token="[SEP]", mask_token="[MASK]", model_max_length=max(spec.seq_len, 512),
                           clean_up_tokenization_spaces=False,
                           model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    hf.save_pretrained(str(out_dir))
    return hf


def _document(rng: random.Random, spec: SyntheticSection, seq_len: int, min_position: int, doc_id: str) -> dict:
    """One SQuAD article: a document of seq_len - 5 words and one question about one of its facts."""
    words_total = seq_len - question_tokens(spec) - 1
    lo = max(0, min_position - question_tokens(spec))  # first document word a fact may start at
    slots = words_total - 1 - lo  # fact starts in [lo, words_total - 2]
    if slots < 3 * spec.num_facts:
        raise ValueError(f"synthetic: {spec.num_facts} facts do not fit between input position {min_position} and "
                         f"the end of a {seq_len}-token input; lower num_facts or min_answer_position")
    words = [f"w{rng.randrange(spec.num_filler_words)}" for _ in range(words_total)]
    keys = rng.sample(range(spec.num_keys), spec.num_facts)
    starts: list[int] = []
    while len(starts) < spec.num_facts:  # facts never touch: at least one filler word between two
        s = rng.randrange(lo, words_total - 1)
        if all(abs(s - t) >= 3 for t in starts):
            starts.append(s)
    values = [rng.randrange(spec.num_values) for _ in keys]
    for s, k, v in zip(starts, keys, values):
        words[s], words[s + 1] = f"k{k}", f"v{v}"
    asked = rng.randrange(spec.num_facts)
    answer_word = starts[asked] + 1
    answer_start = sum(len(w) + 1 for w in words[:answer_word])
    context = " ".join(words)
    answer = f"v{values[asked]}"
    assert context[answer_start:answer_start + len(answer)] == answer
    return {"title": doc_id, "paragraphs": [{"context": context, "qas": [{
        "id": doc_id, "question": " ".join([f"k{keys[asked]}"] * spec.question_repeats + [QUESTION_MARK]),
        "answers": [{"text": answer, "answer_start": answer_start}]}]}]}


def generate_longrange(spec: SyntheticSection, out_dir: str | Path) -> dict[str, Path]:
    """Write train.json, valid.json (SQuAD v1.1) and tokenizer/ into `out_dir`; returns their paths.

    Training: a share `short_fraction` of short documents (facts anywhere), the rest full length with every fact
    at or beyond `min_answer_position`. Valid: full length only, generated from seed + 1.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    n_short = round(spec.short_fraction * spec.num_train)
    train = [_document(rng, spec, spec.short_seq_len, 0, f"train-{i}") for i in range(n_short)]
    train += [_document(rng, spec, spec.seq_len, spec.min_answer_position, f"train-{i}")
              for i in range(n_short, spec.num_train)]
    rng_valid = random.Random(spec.seed + 1)
    valid = [_document(rng_valid, spec, spec.seq_len, spec.min_answer_position, f"valid-{i}")
             for i in range(spec.num_valid)]
    paths = {"train": out_dir / "train.json", "valid": out_dir / "valid.json", "tokenizer": out_dir / "tokenizer"}
    for name, articles in (("train", train), ("valid", valid)):
        paths[name].write_text(json.dumps({"version": "longrange", "data": articles}, ensure_ascii=False),
                               encoding="utf-8")
    build_word_tokenizer(spec, paths["tokenizer"])
    return paths


__all__ = ["QUESTION_MARK", "build_word_tokenizer", "generate_longrange", "question_tokens", "vocabulary"]
