"""The fine-tuning tasks: how each reads its data, which head it trains, how it predicts and what it measures.

| task | kind | head | metric | prediction file (id -> ...) |
|---|---|---|---|---|
| jsquad | extractive QA over long documents (or paragraphs) | QuestionAnswering | exact_match, f1 (JGLUE) | answer text |
| longrange | the generated long-range QA task | QuestionAnswering | exact_match, f1 | answer text |
| jnli | 3-way classification of a pair | SequenceClassification | accuracy | label name |
| jsts | regression on a pair (0-5) | SequenceClassification (1 output) | pearson, spearman | score |
| jcommonsenseqa | 5-way multiple choice | MultipleChoice | accuracy | choice index |
| marc-ja | binary classification of a review | SequenceClassification | accuracy | label name |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..qa.examples import QAExample
from ..qa.features import QAFeature, build_qa_features
from ..qa.prediction import predict_answers
from . import jglue
from .classification import ClassificationCollator, encode_choice_examples, encode_text_examples
from .config import DataSection, EvalSection, TrainSection, parse_slice
from .documents import build_qa_examples
from .metrics import pearson, spearman, squad_scores
from .registry import TASKS
from .trainer import predict_outputs


@dataclass
class Prepared:
    """Model inputs of one file plus what is needed to turn outputs into predictions."""

    features: list
    collate: Any
    report: str
    examples: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _take(items: list, n: int) -> list:
    return items[:n] if n else items


def _accuracy(predictions: dict[str, Any], golds: dict[str, Any]) -> dict[str, Any]:
    """Share of gold ids predicted right; a missing prediction counts as wrong."""
    correct = sum(predictions.get(i) == g for i, g in golds.items())
    return {"accuracy": correct / len(golds), "total": len(golds)}


def _no_article_slices(task: str, data: DataSection) -> None:
    if data.train_articles is not None or data.valid_articles is not None:
        raise ValueError(f"data.train_articles / valid_articles select SQuAD articles (jsquad, longrange); task "
                         f"{task} has none: use data.max_train_examples / max_valid_examples")


class QACollator:
    """[B, N] input_ids / attention_mask / token_type_ids padded to the longest window, plus labels in training."""

    def __init__(self, pad_id: int, training: bool):
        self.pad_id = pad_id
        self.training = training

    def __call__(self, batch: list[QAFeature]) -> dict[str, torch.Tensor]:
        width = max(len(f.input_ids) for f in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for row, f in enumerate(batch):
            n = len(f.input_ids)
            ids[row, :n] = torch.tensor(f.input_ids)
            mask[row, :n] = 1
            types[row, :n] = torch.tensor(f.token_type_ids)
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if self.training:
            out["start_positions"] = torch.tensor([f.start_position for f in batch])
            out["end_positions"] = torch.tensor([f.end_position for f in batch])
        return out


class Task:
    name: str
    head: str  # "qa", "sequence" or "choice"
    num_labels: int = 2

    def prepare(self, path: str, tokenizer, data: DataSection, *, training: bool, max_examples: int = 0) -> Prepared:
        raise NotImplementedError

    def predict(self, model, prepared: Prepared, eval_cfg: EvalSection, train_cfg: TrainSection
                ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(predictions by id, metrics)."""
        raise NotImplementedError

    def golds(self, path: str) -> dict[str, Any]:
        """Example id -> gold (QA: list of texts; others: the label as the prediction file writes it)."""
        raise NotImplementedError

    def score(self, predictions: dict[str, Any], golds: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def outputs(self, model, prepared: Prepared, eval_cfg: EvalSection, train_cfg: TrainSection) -> list[dict]:
        """The model's output arrays over the prepared features, in order, batch by batch."""
        return predict_outputs(model, prepared.features, prepared.collate, batch_size=eval_cfg.batch_size,
                               device=train_cfg.device, precision=train_cfg.precision,
                               progress_bar=train_cfg.progress_bar, desc=f"{self.name} predict")


class QATask(Task):
    head = "qa"

    def __init__(self, name: str):
        self.name = name

    def examples(self, path: str, data: DataSection, max_examples: int = 0, articles: str | None = None
                 ) -> tuple[list[QAExample], str]:
        documents = jglue.read_squad(path)
        note = ""
        if articles is not None:
            total = len(documents)
            documents = documents[parse_slice(articles, "articles")]
            if not documents:
                raise ValueError(f"{path}: the article slice {articles!r} selects none of its {total} articles")
            note = f" (articles [{articles}]: {len(documents)} of {total})"
        examples, report = build_qa_examples(documents, long_document=data.long_document,
                                             on_mismatch=data.on_mismatch)
        return _take(examples, max_examples), report.summary() + note

    def prepare(self, path, tokenizer, data, *, training, max_examples=0, max_length=None, truncate=None):
        articles = data.train_articles if training else data.valid_articles
        examples, doc_report = self.examples(path, data, max_examples, articles)
        features, docs, report = build_qa_features(
            examples, tokenizer, max_length=max_length or data.max_length, doc_stride=data.doc_stride,
            max_query_length=data.max_query_length, training=training,
            windows_without_answer=data.windows_without_answer,
            truncate=data.truncate if truncate is None else truncate)
        return Prepared(features, QACollator(tokenizer.pad_token_id, training),
                        f"{path}:\n  {doc_report}\n  {report.summary()}".replace("\n", "\n  "),
                        examples, {"docs": docs})

    def predict(self, model, prepared, eval_cfg, train_cfg):
        outputs = self.outputs(model, prepared, eval_cfg, train_cfg)
        starts = [row for out in outputs for row in out["start_logits"]]
        ends = [row for out in outputs for row in out["end_logits"]]
        spans = predict_answers(prepared.examples, prepared.features, prepared.extra["docs"], starts, ends,
                                n_best=eval_cfg.n_best, max_answer_tokens=eval_cfg.max_answer_tokens)
        predictions = {qid: span.text for qid, span in spans.items()}
        golds = {e.id: e.gold_texts for e in prepared.examples}
        return predictions, self.score(predictions, golds)

    def golds(self, path):
        return jglue.squad_golds(path)

    def score(self, predictions, golds):
        return squad_scores(predictions, golds)


class SequenceTask(Task):
    head = "sequence"

    def __init__(self, name: str, reader, labels: tuple[str, ...] | None):
        self.name = name
        self.reader = reader
        self.labels = labels  # None: regression
        self.num_labels = len(labels) if labels else 1

    def read(self, path, data, *, training, max_examples=0) -> list:
        """The file's examples (the first max_examples); training needs every one labelled."""
        _no_article_slices(self.name, data)
        examples = _take(self.reader(path), max_examples)
        if training and any(e.label is None for e in examples):
            raise ValueError(f"{path}: {sum(e.label is None for e in examples)} training examples have no label")
        return examples

    def prepare(self, path, tokenizer, data, *, training, max_examples=0, **_):
        examples = self.read(path, data, training=training, max_examples=max_examples)
        encoded = encode_text_examples(examples, tokenizer, data.max_length)
        truncated = sum(len(e.input_ids) >= data.max_length for e in encoded)
        report = f"{path}: {len(examples)} examples" + (f", {truncated} cut to max_length={data.max_length}"
                                                         if truncated else "")
        return Prepared(encoded, ClassificationCollator(tokenizer.pad_token_id, regression=self.labels is None),
                        report, examples)

    def _label_out(self, value):
        return value if self.labels is None else self.labels[value]

    def predict(self, model, prepared, eval_cfg, train_cfg):
        outputs = self.outputs(model, prepared, eval_cfg, train_cfg)
        logits = np.concatenate([out["logits"] for out in outputs])
        if self.labels is None:
            values = [float(v) for v in logits[:, 0]]
        else:
            values = [int(v) for v in logits.argmax(-1)]
        predictions = {e.id: self._label_out(v) for e, v in zip(prepared.examples, values)}
        golds = {e.id: self._label_out(e.label) for e in prepared.examples if e.label is not None}
        return predictions, self.score(predictions, golds) if golds else {"total": 0}

    def golds(self, path):
        return {e.id: self._label_out(e.label) for e in self.reader(path) if e.label is not None}

    def score(self, predictions, golds):
        ids = [i for i in golds if i in predictions]
        if self.labels is None:
            if len(ids) < 2:
                raise ValueError(f"correlations need at least 2 scored examples; {len(ids)} of {len(golds)} have "
                                 f"a prediction")
            pred = [float(predictions[i]) for i in ids]
            gold = [float(golds[i]) for i in ids]
            return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold), "total": len(golds),
                    "scored": len(ids)}
        return _accuracy(predictions, golds)


class ChoiceTask(SequenceTask):
    head = "choice"

    def __init__(self, name: str, reader):
        super().__init__(name, reader, None)
        self.num_labels = 1

    def prepare(self, path, tokenizer, data, *, training, max_examples=0, **_):
        examples = self.read(path, data, training=training, max_examples=max_examples)
        encoded = encode_choice_examples(examples, tokenizer, data.max_length)
        return Prepared(encoded, ClassificationCollator(tokenizer.pad_token_id), f"{path}: {len(examples)} "
                        f"questions with {len(examples[0].choices) if examples else 0} choices", examples)

    def _label_out(self, value):
        return value

    def predict(self, model, prepared, eval_cfg, train_cfg):
        outputs = self.outputs(model, prepared, eval_cfg, train_cfg)
        logits = np.concatenate([out["logits"] for out in outputs])
        predictions = {e.id: int(v) for e, v in zip(prepared.examples, logits.argmax(-1))}
        golds = {e.id: e.label for e in prepared.examples if e.label is not None}
        return predictions, self.score(predictions, golds) if golds else {"total": 0}

    def score(self, predictions, golds):
        return _accuracy(predictions, golds)


# Into the task registry (`registry.TASKS`), the one list of tasks. `FinetuneConfig.task`, the choices of
# `bigbird-ja finetune` and `bigbird-ja evaluate`, and `get_task` all read it; a task added here is a task everywhere.
TASKS.update({task.name: task for task in (
    QATask("jsquad"),
    QATask("longrange"),
    SequenceTask("jnli", jglue.read_jnli, jglue.JNLI_LABELS),
    SequenceTask("jsts", jglue.read_jsts, None),
    ChoiceTask("jcommonsenseqa", jglue.read_jcommonsenseqa),
    SequenceTask("marc-ja", jglue.read_marc_ja, jglue.MARC_LABELS),
)})


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {list(TASKS)}")
    return TASKS[name]


__all__ = ["ChoiceTask", "Prepared", "QACollator", "QATask", "SequenceTask", "TASKS", "Task", "get_task"]
