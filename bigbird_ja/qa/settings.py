"""The settings long-document QA runs with, and how a model folder carries them (`config.json`'s `qa_settings`).

The windows (`features.build_qa_features`): max_length, doc_stride, max_query_length, truncate; the span search
(`prediction.rank_answers`): n_best, max_answer_tokens, max_answer_chars. Fine-tuning's `data` and `eval` sections
take their defaults from `QASettings`, and `bigbird-ja finetune` saves a QA model with the values it was trained and
evaluated with as `config.qa_settings` (a plain dict: transformers keeps an unknown config key as an attribute and
writes it back to config.json, with or without remote code), so the pipeline reads them from the model wherever its
folder is copied. A folder saved before the settings were saved has none: `read_qa_settings` gives None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

CONFIG_ATTRIBUTE = "qa_settings"  # the model config's attribute (a key of config.json)
ANSWER_CHARS_PER_TOKEN = 8  # max_answer_chars' default, per answer token (Japanese has 1-3 characters a token)


@dataclasses.dataclass(frozen=True)
class QASettings:
    """How contexts are windowed and answers searched; the defaults are fine-tuning's.

    max_length: tokens per window, [CLS] question [SEP] ... [SEP] included (fine-tuning's data.max_length).
    doc_stride: document tokens shared by consecutive windows (data.doc_stride).
    max_query_length: question tokens kept (data.max_query_length).
    truncate: keep only the first window of the document (data.truncate).
    n_best: start and end candidates per window (eval.n_best).
    max_answer_tokens: longest answer, in tokens (eval.max_answer_tokens).
    max_answer_chars: longest answer, in characters; None: ANSWER_CHARS_PER_TOKEN x max_answer_tokens
        (`answer_char_limit`). Fine-tuning's evaluation sets no such bound.
    top_k: answers returned per question (a call's choice: never saved with a model).
    source: where the values came from, for messages (never saved with a model).
    """

    max_length: int = 4096
    doc_stride: int = 512
    max_query_length: int = 128
    truncate: bool = False
    n_best: int = 20
    max_answer_tokens: int = 30
    max_answer_chars: int | None = None
    top_k: int = 1
    source: str = "fine-tuning's defaults"

    def __post_init__(self):
        for setting in dataclasses.fields(self):
            if setting.name != "source":
                check_qa_setting(setting.name, getattr(self, setting.name))

    @property
    def answer_char_limit(self) -> int:
        """The longest answer in characters: max_answer_chars, else derived from max_answer_tokens."""
        if self.max_answer_chars is not None:
            return self.max_answer_chars
        return ANSWER_CHARS_PER_TOKEN * self.max_answer_tokens

    def to_saved(self) -> dict:
        """The values a model folder keeps (`SAVED_KEYS`), as config.json holds them."""
        return {name: getattr(self, name) for name in SAVED_KEYS}

    @classmethod
    def from_saved(cls, values: Mapping, source: str) -> QASettings:
        """Settings from what `to_saved` wrote; an unknown key or a bad value is a ValueError naming `source`."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: {CONFIG_ATTRIBUTE} must be a mapping of {list(SAVED_KEYS)}, got "
                             f"{type(values).__name__}")
        unknown = sorted(set(values) - set(SAVED_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown {CONFIG_ATTRIBUTE} keys {unknown}; valid keys are {list(SAVED_KEYS)}")
        try:
            return cls(**values, source=source)
        except ValueError as err:
            raise ValueError(f"{source}: {CONFIG_ATTRIBUTE}.{err}") from None


SAVED_KEYS = tuple(f.name for f in dataclasses.fields(QASettings) if f.name not in ("top_k", "source"))


def check_qa_setting(name: str, value) -> None:
    """A ValueError naming the setting when `value` breaks its rule (max_answer_chars may also be None)."""
    if name == "doc_stride":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"doc_stride={value!r}: must be an integer >= 0")
    elif name == "truncate":
        if not isinstance(value, bool):
            raise ValueError(f"truncate={value!r}: must be True (the first window only) or False")
    elif name == "max_answer_chars" and value is None:
        return
    elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be an integer >= 1")


def read_qa_settings(config, source: str) -> QASettings | None:
    """The settings a model config carries (`config.qa_settings`), else None (a folder saved without them)."""
    saved = getattr(config, CONFIG_ATTRIBUTE, None)
    return None if saved is None else QASettings.from_saved(saved, source)


def write_qa_settings(config, settings: QASettings | None) -> None:
    """Keep `settings` in the model config, so that save_pretrained writes them to config.json; None: drop any."""
    if settings is not None:
        setattr(config, CONFIG_ATTRIBUTE, settings.to_saved())
    elif hasattr(config, CONFIG_ATTRIBUTE):
        delattr(config, CONFIG_ATTRIBUTE)


__all__ = ["ANSWER_CHARS_PER_TOKEN", "CONFIG_ATTRIBUTE", "QASettings", "SAVED_KEYS", "check_qa_setting",
           "read_qa_settings", "write_qa_settings"]
