"""Extractive QA over contexts of any length as a transformers pipeline: `pipeline("long-document-question-answering")`.

    import bigbird_ja  # registers the task
    from transformers import pipeline

    qa = pipeline("long-document-question-answering", model="runs/jsquad/model")
    qa({"question": "...", "context": document})  # -> {"score", "start", "end", "answer"}

Why a task of its own: transformers 5 removed `pipeline("question-answering")`, and `pipeline()` refuses that name
before it looks at the registry (`REMOVED_TASKS`), so the class is registered under a new name through transformers'
custom-pipeline registry (`PIPELINE_REGISTRY.register_pipeline`) when `bigbird_ja` is imported. `pipeline()` then
loads the model with `AutoModelForQuestionAnswering` and the tokenizer with `AutoTokenizer`, as for its own tasks.

One implementation with fine-tuning: the windows are `qa.features.build_qa_features` (question first, overlapping
windows of the document with `doc_stride` tokens shared) and the answers are `qa.prediction.rank_answers` (the best
span over all windows, mapped back to the exact characters of the given context), the functions `bigbird-ja
finetune` and `bigbird-ja evaluate` run. A pipeline call is one question about one context; `start` and `end` index
that context (`context[start:end] == answer`).

Settings (`qa.qa_settings`, a `qa.settings.QASettings`): max_length, doc_stride, max_query_length, truncate (the
windows) and n_best, max_answer_tokens (the span search) are, in order of precedence, the call's keyword arguments,
the `pipeline(...)` keyword arguments, the model's own (`qa_settings` in its config.json: what `bigbird-ja finetune`
trained and evaluated it with), else the defaults (fine-tuning's, with windows cut to the model's
max_position_embeddings when it is shorter: `default_qa_settings`). A folder saved before models carried their
settings has none in its config.json; for it the settings of the fine-tuning run that saved it are read where
`bigbird-ja evaluate --model <run>/model` reads them (`<run>/config.yaml` beside `<run>/model`; its `data` and `eval`
keys), when the folder holds a question-answering model and the file names a task. `top_k` (default 1) answers are
returned per question: a dict for top_k=1, else a list of at most top_k distinct spans, best first.

Answers are bounded in characters as well as tokens: `max_answer_chars` (default `ANSWER_CHARS_PER_TOKEN` = 8 per
answer token, 240 for max_answer_tokens=30; Japanese text has 1-3 characters a token) drops any span longer than
that from the candidates, so a span whose token offsets are wider than the text they hold never becomes a long
"answer" (byte pieces carry their own character's span, see `qa.features`; what is left is a token's end
extended over characters NFKC absorbed). `bigbird-ja evaluate` sets no such bound; the answers agree wherever the
bound does not bind.

Score: start logit + end logit of the span, the quantity the answers are ranked by (not a probability). When no
candidate span fits the bounds (none of the n_best starts pairs with one of the n_best ends within
max_answer_tokens and max_answer_chars), the answer is the empty one scored -inf, as in `bigbird-ja evaluate`.

What is refused, with a ValueError that names the argument: a question or context that is empty or holds only
whitespace and control characters, or that is not valid Unicode (a lone surrogate such as "\\ud800", which no
tokenizer takes). A model folder is checked against its checksums.json before it is used: `from_pretrained` of
the package's models does it before reading a weight (its DamagedFolderError is not a ValueError, so `pipeline(...)`
lets it through as it is rather than inside its "Could not load model" summary), the pipeline itself the folder of
any other model. Non-finite logits (NaN, inf: damaged or diverged weights) are an error naming the model folder, never
an answer.

Batching (`batch_size=`): windows of several questions share a forward pass only when they have the same length,
so no window is ever padded and an answer is computed the same way alone or in any batch: `batch_size` changes the
speed, never the answers, whatever the attention layout makes of padding (in the first version of
`attention.layout`, a padded window drew other random blocks). Full windows all have `max_length` tokens, so they
batch together; only a document's last window is shorter.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import torch
from transformers.pipelines.base import ChunkPipeline

from .common.atomic_io import atomic_write_bytes
from .common.config_io import read_yaml
from .qa.examples import QAExample
from .qa.features import build_qa_features
from .qa.prediction import rank_answers
from .qa.settings import QASettings, check_qa_setting, read_qa_settings

QA_TASK = "long-document-question-answering"
_WINDOW_KEYS = ("max_length", "doc_stride", "max_query_length", "truncate")
_SPAN_KEYS = ("n_best", "max_answer_tokens", "max_answer_chars", "top_k")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _model_folder(model) -> Path | None:
    """The local folder `model` was loaded from, else None (a Hub id, a model built in memory)."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(name) if name and Path(name).is_dir() else None


def _run_config_settings(model, folder: Path) -> QASettings | None:
    """The settings of the QA fine-tuning run that saved `folder` as `<run>/model`, else None: for a folder saved
    before models carried their settings in config.json.

    The rule of `bigbird-ja evaluate --model` (the run's config.yaml beside the model folder), read as plain YAML:
    a file that names no task (a pretraining run's, say), or one beside a model that is no question-answering model
    (a classification run's), is not a QA fine-tuning run's and is not used.
    """
    candidate = folder.parent / "config.yaml"
    if not candidate.is_file():
        return None
    run = read_yaml(candidate, "fine-tune config")
    architectures = getattr(model.config, "architectures", None) or []
    if not isinstance(run.get("task"), str) or not any(a.endswith("ForQuestionAnswering") for a in architectures):
        return None
    sections = {name: run.get(name) if isinstance(run.get(name), dict) else {} for name in ("data", "eval")}
    given = {key: sections["data"][key] for key in _WINDOW_KEYS if key in sections["data"]}
    given.update({key: sections["eval"][key] for key in ("n_best", "max_answer_tokens") if key in sections["eval"]})
    try:
        return QASettings(**given, source=str(candidate))
    except ValueError as err:
        raise ValueError(f"{candidate}: {err}") from None


def qa_settings_for(model) -> QASettings:
    """The default settings of a pipeline over `model`: its config's, else (a folder saved without them) its
    fine-tuning run's, else the defaults. See the module docstring."""
    folder = _model_folder(model)
    source = str(folder / "config.json") if folder is not None else f"the config of {type(model).__name__}"
    saved = read_qa_settings(model.config, source)
    if saved is not None:
        return saved
    from_run = _run_config_settings(model, folder) if folder is not None else None
    return from_run if from_run is not None else default_qa_settings(model.config)


def default_qa_settings(config) -> QASettings:
    """Fine-tuning's defaults, with windows no longer than the model takes: a model of fewer than 4,096 tokens gets
    windows of its `max_position_embeddings` and a stride of at most a quarter of a window (fine-tuning's ratio)."""
    defaults = QASettings()
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit >= defaults.max_length:
        return defaults
    return dataclasses.replace(defaults, max_length=limit, doc_stride=min(defaults.doc_stride, limit // 4),
                               max_query_length=min(defaults.max_query_length, limit // 4),
                               source=f"fine-tuning's defaults, windows cut to the model's "
                                      f"max_position_embeddings={limit}")


class LongDocumentQuestionAnsweringPipeline(ChunkPipeline):
    """Answers a question about a context of any length: {"question", "context"} -> {"score", "start", "end",
    "answer"} (a list of them for top_k > 1; a list of results for a list of inputs). See the module docstring."""

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __init__(self, model, *args, **kwargs):
        from .common.checksums import verify_model_folder
        from .modeling import BigBirdJaPreTrainedModel

        folder = _model_folder(model)
        if folder is not None and not isinstance(model, BigBirdJaPreTrainedModel):  # whose from_pretrained did it
            verify_model_folder(folder)
        self.qa_settings = qa_settings_for(model)  # before Pipeline.__init__, which checks the keyword arguments
        super().__init__(model, *args, **kwargs)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{QA_TASK} needs a fast tokenizer (character offsets, tokenizer.json); got "
                             f"{type(self.tokenizer).__name__}")
        self.qa_settings = dataclasses.replace(self.qa_settings, **self._preprocess_params,
                                               **self._postprocess_params)
        # What the fine-tuning collator gives the model; a QA model of another family may not take token types.
        self._token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters

    def __call__(self, inputs=None, *, question=None, context=None, **kwargs):
        """inputs: {"question": str, "context": str}, or a list of them; or question= and context= (strings, or
        lists of equal length). Keywords: top_k, max_length, doc_stride, max_query_length, truncate, n_best,
        max_answer_tokens, max_answer_chars, batch_size (windows per forward pass)."""
        if (question is None) != (context is None) or (inputs is None) == (question is None):
            raise ValueError(f"{QA_TASK}: pass inputs ({{'question': ..., 'context': ...}} or a list of them), or "
                             f"question= and context=")
        if question is not None:
            if isinstance(question, (list, tuple)) != isinstance(context, (list, tuple)) or (
                    isinstance(question, (list, tuple)) and len(question) != len(context)):
                raise ValueError("question= and context= must be two strings or two lists of the same length")
            inputs = [{"question": q, "context": c} for q, c in zip(question, context)] \
                if isinstance(question, (list, tuple)) else {"question": question, "context": context}
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, max_length=None, doc_stride=None, max_query_length=None, truncate=None,
                             n_best=None, max_answer_tokens=None, max_answer_chars=None, top_k=None):
        given = dict(max_length=max_length, doc_stride=doc_stride, max_query_length=max_query_length,
                     truncate=truncate, n_best=n_best, max_answer_tokens=max_answer_tokens,
                     max_answer_chars=max_answer_chars, top_k=top_k)
        for name, value in given.items():
            if value is not None:
                check_qa_setting(name, value)
        preprocess = {k: given[k] for k in _WINDOW_KEYS if given[k] is not None}
        postprocess = {k: given[k] for k in _SPAN_KEYS if given[k] is not None}
        return preprocess, {}, postprocess

    def preprocess(self, inputs, **settings):
        """The windows of one question: build_qa_features over a one-question example."""
        if not isinstance(inputs, dict) or not isinstance(inputs.get("question"), str) \
                or not isinstance(inputs.get("context"), str):
            got = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ValueError(f"{QA_TASK}: each input is a dict with 'question' and 'context' (strings); got {got}")
        _check_text("question", inputs["question"], "ask it in words")
        _check_text("context", inputs["context"], "pass the text that holds the answer")
        s = dataclasses.replace(self.qa_settings, **settings)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and s.max_length > limit:
            raise ValueError(f"max_length={s.max_length} (from {s.source} unless passed) exceeds the model's "
                             f"max_position_embeddings={limit}; pass max_length=<={limit} and a doc_stride below the "
                             f"document tokens a window holds, to pipeline(...) or to the call")
        example = QAExample(id="0", question=inputs["question"], context=inputs["context"], document_id="0",
                            answers=[], gold_texts=[])
        try:
            features, docs, _ = build_qa_features([example], self.tokenizer, max_length=s.max_length,
                                                  doc_stride=s.doc_stride, max_query_length=s.max_query_length,
                                                  truncate=s.truncate)
        except ValueError as err:  # its messages name fine-tuning's fields (data.*): the same settings
            raise ValueError(f"{err} (the pipeline's max_length={s.max_length}, doc_stride={s.doc_stride}, "
                             f"max_query_length={s.max_query_length})") from None
        # Guards for a tokenizer that drops characters (ours never does: byte fallback, "▁" for spaces)
        if not len(docs["0"]):
            raise ValueError("context holds no token for the model: the tokenizer reads nothing in it")
        if features[0].context_start == 2:  # [CLS] [SEP]: no question token
            raise ValueError("question holds no token for the model: the tokenizer reads nothing in it")
        for i, feature in enumerate(features):
            yield {"feature": feature, "example": example, "doc": docs["0"], "is_last": i == len(features) - 1}

    def _forward(self, model_inputs):
        batched = isinstance(model_inputs["is_last"], list)  # batch_size > 1: transformers' collator made lists
        rows = {k: v if batched else [v] for k, v in model_inputs.items()}
        features = rows["feature"]
        start_logits, end_logits = [None] * len(features), [None] * len(features)
        # Windows of one length per forward pass: never padded, so the batch cannot change an answer.
        by_length: dict[int, list[int]] = {}
        for i, feature in enumerate(features):
            by_length.setdefault(len(feature.input_ids), []).append(i)
        for group in by_length.values():
            ids = torch.tensor([features[i].input_ids for i in group], device=self.device)  # [b, N]
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if self._token_types:
                batch["token_type_ids"] = torch.tensor([features[i].token_type_ids for i in group], device=self.device)
            out = self.model(**batch)
            starts = out.start_logits.float().cpu().numpy()  # [b, N], as bigbird-ja evaluate reads them
            ends = out.end_logits.float().cpu().numpy()
            if not (np.isfinite(starts).all() and np.isfinite(ends).all()):  # NaN would rank as an answer
                name = getattr(self.model, "name_or_path", "") or f"(a {type(self.model).__name__} built in memory)"
                raise ValueError(f"model {name} gives non-finite start/end logits (NaN or inf) on a window of "
                                 f"{ids.shape[1]} tokens: its weights are damaged or diverged in training. Check "
                                 f"the folder against its checksums.json, copy it again, or re-run the fine-tuning "
                                 f"that saved it")
            for row, i in enumerate(group):
                start_logits[i], end_logits[i] = starts[row], ends[row]
        outputs = {"start_logits": start_logits, "end_logits": end_logits, **rows}
        return outputs if batched else {k: v[0] for k, v in outputs.items()}

    def postprocess(self, all_outputs, **settings):
        s = dataclasses.replace(self.qa_settings, **settings)
        answers = rank_answers(
            all_outputs[0]["example"], all_outputs[0]["doc"], [o["feature"] for o in all_outputs],
            [np.asarray(o["start_logits"]).reshape(-1) for o in all_outputs],
            [np.asarray(o["end_logits"]).reshape(-1) for o in all_outputs],
            n_best=s.n_best, max_answer_tokens=s.max_answer_tokens, top_k=s.top_k,
            max_answer_chars=s.answer_char_limit)
        results = [{"score": a.score, "start": a.start, "end": a.end, "answer": a.text} for a in answers]
        return results[0] if s.top_k == 1 else results

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Save the model and the tokenizer: a folder the pipeline loads from again, with the package or (remote
        code) without it.

        Not transformers' own way (it copies the pipeline's module as it is: the package's, whose imports a folder
        cannot resolve): the package's save hook writes the generated copy of this module and `custom_pipelines`
        (`bigbird_ja.hub`). Run from that copy (no package), the model's save copies only the model's code, so the
        files of this module that the saved config still names are copied beside it.
        """
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        self.tokenizer.save_pretrained(save_directory, **kwargs)
        impl = ((getattr(self.model.config, "custom_pipelines", None) or {}).get(QA_TASK) or {}).get("impl", "")
        target = Path(save_directory) / f"{impl.rpartition('.')[0]}.py"
        if impl and not target.exists() and Path(__file__).name == target.name:
            from transformers.dynamic_module_utils import get_relative_import_files

            for source in map(Path, [__file__, *get_relative_import_files(__file__)]):
                if not (Path(save_directory) / source.name).exists():
                    atomic_write_bytes(Path(save_directory) / source.name, source.read_bytes(), durable=False)


def _check_text(argument: str, text: str, fix: str) -> None:
    """A ValueError naming `argument` for text that means nothing or is not valid Unicode."""
    surrogate = _SURROGATE.search(text)
    if surrogate:
        raise ValueError(f"{argument} is not valid Unicode: a lone surrogate U+{ord(surrogate.group()):04X} at "
                         f"character {surrogate.start()} (text decoded with errors='surrogateescape' or cut inside "
                         f"a UTF-16 pair); decode it with errors='replace', or fix where it comes from")
    # stops at the first visible character: cheap on a whole document
    if not any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf") for c in text):
        raise ValueError(f"{argument} is empty or holds only whitespace and control characters ({text[:20]!r}); "
                         f"{fix}")


def register_pipeline() -> None:
    """Register `QA_TASK` with transformers' pipeline registry (done by `import bigbird_ja`)."""
    from transformers import AutoModelForQuestionAnswering
    from transformers.pipelines import PIPELINE_REGISTRY

    current = PIPELINE_REGISTRY.supported_tasks.get(QA_TASK)
    if current is None or current["impl"] is not LongDocumentQuestionAnsweringPipeline:
        PIPELINE_REGISTRY.register_pipeline(QA_TASK, pipeline_class=LongDocumentQuestionAnsweringPipeline,
                                            pt_model=AutoModelForQuestionAnswering, type="text")


__all__ = ["LongDocumentQuestionAnsweringPipeline", "QA_TASK", "default_qa_settings", "qa_settings_for",
           "register_pipeline"]
