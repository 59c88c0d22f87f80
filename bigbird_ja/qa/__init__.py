"""Long-document extractive QA: one implementation for `bigbird-ja finetune` / `evaluate` and the pipeline.

Modules, one concept each:

* `examples`    a question about a context (a document of any length) and its checked gold answers
* `features`    question-first windows with doc stride; answer token positions from character offsets
* `prediction`  the best spans over all windows, mapped back to the exact characters of the context
* `settings`    `QASettings` (windows and span search) and how a model's config.json carries them

This package sits in the inference layer, above the model and below fine-tuning: it imports neither (a tokenizer
and logits are what it is given).
"""

from .examples import Answer, QAExample
from .features import DocumentTokens, FeatureReport, QAFeature, build_qa_features, tokenize_document
from .prediction import SpanPrediction, predict_answers, rank_answers
from .settings import QASettings, read_qa_settings, write_qa_settings

__all__ = ["Answer", "DocumentTokens", "FeatureReport", "QAExample", "QAFeature", "QASettings", "SpanPrediction",
           "build_qa_features", "predict_answers", "rank_answers", "read_qa_settings", "tokenize_document",
           "write_qa_settings"]
