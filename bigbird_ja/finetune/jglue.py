"""Readers of the JGLUE files (v1.3 layout) into plain examples.

| task | file format | example |
|---|---|---|
| jsquad | SQuAD v1.1 JSON (`{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}`) | `SquadArticle` (see `documents.py` for QA examples) |
| jnli | JSON lines: sentence_pair_id, sentence1, sentence2, label (entailment / contradiction / neutral) | `TextExample` |
| jsts | JSON lines: sentence_pair_id, sentence1, sentence2, label (0.0-5.0) | `TextExample` (float label) |
| jcommonsenseqa | JSON lines: q_id, question, choice0..choice4, label (0-4) | `ChoiceExample` |
| marc-ja | JSON lines: review_id (optional), sentence, label (positive / negative) | `TextExample` |

A row that lacks a field, has one of the wrong type or an unknown label is an error naming the file, line (or the
question id) and field, with the value and its type: a reader never guesses (an ``answer_start`` of "0", a string,
is not read as the offset 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JNLI_LABELS = ("entailment", "contradiction", "neutral")
MARC_LABELS = ("positive", "negative")
JCQA_NUM_CHOICES = 5


@dataclass
class TextExample:
    """One sentence or sentence pair with a class index (classification) or a float (regression)."""

    id: str
    text_a: str
    text_b: str | None
    label: int | float | None


@dataclass
class ChoiceExample:
    """A multiple-choice question: the question is paired with each choice in turn."""

    id: str
    question: str
    choices: list[str]
    label: int | None


@dataclass
class SquadQuestion:
    id: str
    question: str
    answers: list[dict[str, Any]]  # [{"text": str, "answer_start": int}], as in the file


@dataclass
class SquadParagraph:
    context: str
    questions: list[SquadQuestion] = field(default_factory=list)


@dataclass
class SquadArticle:
    title: str
    paragraphs: list[SquadParagraph] = field(default_factory=list)


class DataFormatError(ValueError):
    """A data file that does not have the task's format; the message names the file, the line and the field."""


def _read_json_lines(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{line_no}: not a JSON object ({err.msg}); JGLUE classification "
                                      f"files are JSON lines, one example a line") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
    if not rows:
        raise DataFormatError(f"{path}: no examples (the file is empty)")
    return rows


def _field(row: dict, name: str, where: str):
    if name not in row:
        raise DataFormatError(f"{where}: missing field {name!r} (has {sorted(row)})")
    return row[name]


def _class_index(value, labels: tuple[str, ...], where: str) -> int:
    if value not in labels:
        raise DataFormatError(f"{where}: label {value!r} is not one of {list(labels)}")
    return labels.index(value)


def read_jnli(path: str | Path) -> list[TextExample]:
    out = []
    for line_no, row in _read_json_lines(path):
        where = f"{path}:{line_no}"
        label = row.get("label")
        out.append(TextExample(
            id=str(_field(row, "sentence_pair_id", where)), text_a=_field(row, "sentence1", where),
            text_b=_field(row, "sentence2", where),
            label=None if label is None else _class_index(label, JNLI_LABELS, where)))
    return out


def read_jsts(path: str | Path) -> list[TextExample]:
    out = []
    for line_no, row in _read_json_lines(path):
        where = f"{path}:{line_no}"
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (int, float))):
            raise DataFormatError(f"{where}: label {label!r} is not a number (JSTS scores are 0.0-5.0)")
        out.append(TextExample(
            id=str(_field(row, "sentence_pair_id", where)), text_a=_field(row, "sentence1", where),
            text_b=_field(row, "sentence2", where), label=None if label is None else float(label)))
    return out


def read_jcommonsenseqa(path: str | Path) -> list[ChoiceExample]:
    out = []
    for line_no, row in _read_json_lines(path):
        where = f"{path}:{line_no}"
        choices = [_field(row, f"choice{i}", where) for i in range(JCQA_NUM_CHOICES)]
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or label not in range(JCQA_NUM_CHOICES)):
            raise DataFormatError(f"{where}: label {label!r} is not a choice index 0-{JCQA_NUM_CHOICES - 1}")
        out.append(ChoiceExample(id=str(_field(row, "q_id", where)), question=_field(row, "question", where),
                                 choices=choices, label=label))
    return out


def read_marc_ja(path: str | Path) -> list[TextExample]:
    out = []
    for index, (line_no, row) in enumerate(_read_json_lines(path)):
        where = f"{path}:{line_no}"
        label = row.get("label")
        out.append(TextExample(
            id=str(row.get("review_id", index)), text_a=_field(row, "sentence", where), text_b=None,
            label=None if label is None else _class_index(label, MARC_LABELS, where)))
    return out


def read_json_file(path: str | Path, what: str, expected: str):
    """One JSON document; a missing file or invalid JSON is an error naming the file and what was `expected`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not JSON ({err.msg} at line {err.lineno}); expected {expected}") from None


_SQUAD_TYPES = {  # field -> (accepted types, what the message calls them)
    "paragraphs": ((list,), "a list of paragraphs"), "qas": ((list,), "a list of questions"),
    "context": ((str,), "a string"), "id": ((str, int), "a string"), "question": ((str,), "a string"),
    "answers": ((list,), "a list of {\"text\", \"answer_start\"} objects"), "text": ((str,), "a string"),
    "answer_start": ((int,), "an integer (the character offset of the answer in the context, e.g. 0, not \"0\")"),
}


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + " ..."


def _typed(obj: dict, name: str, where: str, default=None):
    """``obj[name]`` of the type JSQuAD gives it (see `_SQUAD_TYPES`); ``default`` for an optional field."""
    if default is not None and name not in obj:
        return default
    value = _field(obj, name, where)
    types, expected = _SQUAD_TYPES[name]
    if not isinstance(value, types) or isinstance(value, bool):  # bool is an int to Python, not to JSON
        raise DataFormatError(f"{where}: {name} is {_short(value)} ({type(value).__name__}), expected {expected}")
    return value


def _object(value, where: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise DataFormatError(f"{where}: expected {what} object, got {_short(value)} ({type(value).__name__})")
    return value


def read_squad(path: str | Path) -> list[SquadArticle]:
    """A SQuAD v1.1-format file (JSQuAD) as articles -> paragraphs -> questions, in file order.

    Every field is type-checked: an error names where it is (with the question id), the field, its value and type.
    """
    data = read_json_file(path, "data", "one SQuAD v1.1 JSON object (JSQuAD's format)")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataFormatError(f"{path}: expected a SQuAD v1.1 object {{\"data\": [articles]}}")
    articles = []
    for a_idx, article in enumerate(data["data"]):
        where = f"{path}: data[{a_idx}]"
        article = _object(article, where, "an article")
        paragraphs = []
        for p_idx, paragraph in enumerate(_typed(article, "paragraphs", where)):
            p_where = f"{where}.paragraphs[{p_idx}]"
            paragraph = _object(paragraph, p_where, "a paragraph")
            context = _typed(paragraph, "context", p_where)
            questions = []
            for q_idx, qa in enumerate(_typed(paragraph, "qas", p_where, default=[])):
                qa = _object(qa, f"{p_where}.qas[{q_idx}]", "a question")
                q_id = _typed(qa, "id", f"{p_where}.qas[{q_idx}]")
                q_where = f"{p_where}.qas[{q_idx}] (question id {q_id!r})"
                if qa.get("is_impossible"):
                    raise DataFormatError(f"{q_where}: is_impossible questions (SQuAD 2.0) are not supported; "
                                          f"JSQuAD has none")
                question = _typed(qa, "question", q_where)
                answers = _typed(qa, "answers", q_where)
                for k, answer in enumerate(answers):
                    a_where = f"{q_where}.answers[{k}]"
                    answer = _object(answer, a_where, "an answer")
                    _typed(answer, "text", a_where)
                    _typed(answer, "answer_start", a_where)
                questions.append(SquadQuestion(id=str(q_id), question=question, answers=list(answers)))
            paragraphs.append(SquadParagraph(context=context, questions=questions))
        articles.append(SquadArticle(title=str(article.get("title", f"article-{a_idx}")), paragraphs=paragraphs))
    return articles


def squad_golds(path: str | Path) -> dict[str, list[str]]:
    """Question id -> gold answer texts, in file order (what the JSQuAD metric compares against)."""
    golds: dict[str, list[str]] = {}
    for article in read_squad(path):
        for paragraph in article.paragraphs:
            for q in paragraph.questions:
                if q.id in golds:
                    raise DataFormatError(f"{path}: question id {q.id!r} appears twice; ids must be unique")
                golds[q.id] = [a["text"] for a in q.answers]
    return golds


__all__ = [
    "ChoiceExample", "DataFormatError", "JNLI_LABELS", "MARC_LABELS", "SquadArticle", "SquadParagraph",
    "SquadQuestion", "TextExample", "read_jcommonsenseqa", "read_json_file", "read_jnli", "read_jsts", "read_marc_ja", "read_squad",
    "squad_golds",
]
