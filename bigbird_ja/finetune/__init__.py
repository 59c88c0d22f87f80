"""Fine-tuning and evaluation on JGLUE (`bigbird-ja finetune`, `bigbird-ja evaluate`), long-document JSQuAD and a
generated long-range QA task.

Modules, one concept each:

* `registry`        the task registry: task name -> task, the one list of tasks
* `config`          typed run-config sections (strict YAML, `--section.key=value` overrides)
* `jglue`           readers of the JGLUE files (JSQuAD, JNLI, JSTS, JCommonsenseQA, MARC-ja)
* `documents`       QA examples over long documents (paragraphs of an article joined) or paragraphs; offset checks
* `metrics`         the JSQuAD metric as JGLUE defines it; accuracy, Pearson, Spearman
* `answer_coverage` how many answers a tokenizer lets a span predictor recover exactly (token boundaries)
* `classification`  sentence-pair and multiple-choice inputs
* `longrange`       the generated long-range QA task and its word-level tokenizer
* `tasks`           per task: reader, head, prediction, metric
* `trainer`         the training loop and batched prediction
* `run`             `finetune`, `evaluate_predictions`, `evaluate_model`

Long-document QA itself (windows, span ranking, the settings a QA model is saved with) is `bigbird_ja.qa`, which
the pipeline shares. Importing this package imports neither DeepSpeed nor the tokenizer trainer (MeCab,
sentencepiece).
"""

from .config import FinetuneConfig, load_finetune_config
from .documents import build_qa_examples
from .metrics import normalize_answer, squad_scores
from .run import evaluate_model, evaluate_predictions, finetune

__all__ = ["FinetuneConfig", "build_qa_examples", "evaluate_model", "evaluate_predictions", "finetune",
           "load_finetune_config", "normalize_answer", "squad_scores"]
