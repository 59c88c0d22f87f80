"""Text embeddings from a bigbird-ja encoder: sentence-transformers files in every saved folder, documents longer
than one window, and a retrieval evaluation (JSQuAD questions against the articles of a split).

Pooling. The model is pretrained by masked-language modelling only, so no token was trained to summarise the input:
the embedding is the mean of the last hidden states over the tokens of the input ([CLS] and [SEP] included, padding
excluded), sentence-transformers' "mean" mode. `POOLING` names it; `sentence_transformers_files` writes it into the
folder (modules.json, sentence_bert_config.json, 1_Pooling/config.json, config_sentence_transformers.json), so
`SentenceTransformer(folder)` after `import bigbird_ja`, or `SentenceTransformer(folder, trust_remote_code=True)`
without the package, pools as `embed` does. `import bigbird_ja` makes every `save_pretrained` write them
(`bigbird_ja.hub`).

Documents longer than one window. sentence-transformers cuts every input at `max_seq_length` (the model's
`max_position_embeddings`). `embed` instead cuts a longer text into consecutive windows of `max_length` tokens, each
read as `[CLS] piece [SEP]`, and returns the mean over every token of every window: the windows' mean-pooled vectors
weighted by their token counts. A text that fits one window gets exactly sentence-transformers' vector.

    import bigbird_ja
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    vectors = bigbird_ja.embeddings.embed(model, tokenizer, ["短い文。", long_document])  # [2, hidden]

Retrieval evaluation (`evaluate_retrieval`, `bigbird-ja evaluate jsquad --retrieval`): every question of a JSQuAD
file is a query, every article of the file (its paragraphs joined by newlines, as long-document fine-tuning joins
them) a document, and the article the question was asked about the one relevant document. Queries and documents
are embedded by `embed`, ranked by cosine similarity; recall@k (the article is among the k nearest) and MRR are
reported. `truncate_to` keeps only a document's first N tokens: the same model read as a model of N tokens would
read the articles.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .common.atomic_io import atomic_write_text

POOLING = "mean"
# the files sentence-transformers reads, in the format every version since 2 loads
_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                  "lasttoken")


def sentence_transformers_files(config) -> dict[str, str]:
    """``{path in the folder: text}`` of the sentence-transformers module files for a model of ``config``."""
    pooling = {"word_embedding_dimension": config.hidden_size,
               **{f"pooling_mode_{mode}": mode == "mean_tokens" for mode in _POOLING_MODES}, "include_prompt": True}
    files = {"modules.json": _MODULES,
             "sentence_bert_config.json": {"max_seq_length": config.max_position_embeddings, "do_lower_case": False},
             "1_Pooling/config.json": pooling,
             "config_sentence_transformers.json": {"prompts": {}, "default_prompt_name": None,
                                                   "similarity_fn_name": "cosine"}}
    return {path: json.dumps(value, indent=2) + "\n" for path, value in files.items()}


def write_sentence_transformers_files(config, folder) -> list[Path]:
    """Write `sentence_transformers_files` into ``folder`` (a save hook: before config.json)."""
    written = []
    for name, text in sentence_transformers_files(config).items():
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text, durable=False)  # no fsync, as transformers writes the weights
        written.append(path)
    return written


def _windows(ids: list[int], width: int) -> list[list[int]]:
    """Consecutive pieces of at most ``width`` tokens (at least one piece, maybe empty)."""
    return [ids[i:i + width] for i in range(0, max(len(ids), 1), width)]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], max_length: int | None = None, truncate_to: int | None = None,
          batch_size: int = 8) -> torch.Tensor:
    """Mean-pooled embeddings of ``texts`` ([len(texts), hidden], float32, on the CPU), texts of any length.

    model: an encoder (`AutoModel`, or any model whose output has `last_hidden_state`); tokenizer: its tokenizer.
    max_length: tokens per window, [CLS] and [SEP] included; default and upper bound: the model's
        max_position_embeddings. A longer text is read in consecutive windows (see the module docstring).
    truncate_to: keep only the first N tokens of each text ([CLS] and [SEP] included), windows inside them.
    batch_size: windows per forward pass; windows of one length only, so no window is padded.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    max_length = max_length or limit
    if not isinstance(max_length, int) or max_length < 3:
        raise ValueError(f"max_length={max_length!r}: must be an integer >= 3 ([CLS] token [SEP])")
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings={limit}; pass "
                         f"max_length<={limit} (longer texts are read in windows)")
    if truncate_to is not None and (not isinstance(truncate_to, int) or truncate_to < 3):
        raise ValueError(f"truncate_to={truncate_to!r}: must be an integer >= 3 ([CLS] token [SEP])")
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings; wrap one text in a list")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    windows: list[tuple[int, list[int]]] = []  # (text index, ids of one window)
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # windows follow: no warning
        if truncate_to is not None:
            ids = ids[:truncate_to - 2]
        windows += [(i, [cls, *piece, sep]) for piece in _windows(ids, max_length - 2)]
    device = next(model.parameters()).device
    sums = torch.zeros(len(texts), model.config.hidden_size, dtype=torch.float64)
    counts = torch.zeros(len(texts), dtype=torch.float64)
    by_length: dict[int, list[int]] = {}
    for w, (_, ids) in enumerate(windows):
        by_length.setdefault(len(ids), []).append(w)
    for length, members in sorted(by_length.items()):
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            ids = torch.tensor([windows[w][1] for w in chunk], device=device)  # [b, length]
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # [b, length, H]
            totals = hidden.double().sum(1).cpu()  # [b, H]
            for row, w in enumerate(chunk):
                sums[windows[w][0]] += totals[row]
                counts[windows[w][0]] += length
    return (sums / counts[:, None]).float()


def jsquad_retrieval_task(articles) -> tuple[list[str], list[str], list[int]]:
    """(documents, questions, the document index of each question) of JSQuAD articles as `bigbird_ja.finetune`'s
    `read_squad` reads and checks them: one document per article, its paragraphs joined by newlines."""
    documents, questions, relevant = [], [], []
    for article in articles:
        documents.append("\n".join(p.context for p in article.paragraphs))
        for paragraph in article.paragraphs:
            questions += [q.question for q in paragraph.questions]
            relevant += [len(documents) - 1] * len(paragraph.questions)
    if not questions:
        raise ValueError("the JSQuAD file holds no questions")
    return documents, questions, relevant


def retrieval_metrics(queries: torch.Tensor, documents: torch.Tensor, relevant: list[int],
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """recall@k and MRR of cosine-similarity ranking; `relevant[i]` is query i's one relevant document."""
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    d = torch.nn.functional.normalize(documents.double(), dim=1)
    scores = q @ d.T  # [queries, documents]
    target = scores[torch.arange(len(relevant)), torch.tensor(relevant)]
    rank = (scores > target[:, None]).sum(1) + 1  # ties resolved in the relevant document's favour
    metrics = {f"recall@{k}": float((rank <= k).double().mean()) * 100 for k in ks}
    metrics["mrr"] = float((1.0 / rank.double()).mean()) * 100
    return metrics


def evaluate_retrieval(model_dir, articles, max_length: int | None = None, truncate_to: int | None = None,
                       batch_size: int = 8, output=None) -> dict:
    """Retrieval metrics of the encoder in ``model_dir`` on JSQuAD articles (`read_squad`'s; see the module
    docstring); writes them as JSON to ``output`` when given."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    documents, questions, relevant = jsquad_retrieval_task(articles)
    max_length = max_length or model.config.max_position_embeddings
    doc_vectors = embed(model, tokenizer, documents, max_length=max_length, truncate_to=truncate_to,
                        batch_size=batch_size)
    query_vectors = embed(model, tokenizer, questions, max_length=max_length, batch_size=batch_size)
    lengths = [len(tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"]) + 2 for d in documents]
    read = [min(n, truncate_to) if truncate_to else n for n in lengths]
    metrics = {**retrieval_metrics(query_vectors, doc_vectors, relevant), "questions": len(questions),
               "documents": len(documents), "max_length": max_length, "truncate_to": truncate_to,
               "document_tokens_mean": round(sum(lengths) / len(lengths), 1),
               "document_tokens_read_mean": round(sum(read) / len(read), 1),
               "windows_per_document_max": max(math.ceil((n - 2) / (max_length - 2)) for n in read),
               "pooling": POOLING}
    if output is not None:
        atomic_write_text(Path(output), json.dumps(metrics, indent=2) + "\n")
    return metrics


__all__ = ["POOLING", "embed", "evaluate_retrieval", "jsquad_retrieval_task", "retrieval_metrics",
           "sentence_transformers_files", "write_sentence_transformers_files"]
