"""bigbird-ja: long-context Japanese encoders (BigBird block-sparse x DeBERTa-v2 disentangled attention).

`import bigbird_ja` registers `BigBirdJaConfig` and the models with transformers' `Auto*` classes (the same heads
as DeBERTa-v2, including `AutoModelForPreTraining` -> the masked-LM model and `AutoModelForTextEncoding` -> the
encoder), the "long-document-question-answering" pipeline (`bigbird_ja.pipelines`) and the writer of the model's
code into every folder `save_pretrained` makes (`bigbird_ja.hub`). It imports neither triton nor deepspeed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTextEncoding,
    AutoModelForTokenClassification,
)

from .attention import attention_mask, disentangled_attention
from .configuration import BigBirdJaConfig
from .hub import register_remote_code
from .modeling import (
    BigBirdJaForMaskedLM,
    BigBirdJaForMultipleChoice,
    BigBirdJaForQuestionAnswering,
    BigBirdJaForSequenceClassification,
    BigBirdJaForTokenClassification,
    BigBirdJaModel,
    BigBirdJaPreTrainedModel,
)
from .pipelines import QA_TASK, LongDocumentQuestionAnsweringPipeline, register_pipeline
from .version import __version__

AutoConfig.register(BigBirdJaConfig.model_type, BigBirdJaConfig, exist_ok=True)
for _auto, _model in (
    (AutoModel, BigBirdJaModel),
    (AutoModelForMaskedLM, BigBirdJaForMaskedLM),
    (AutoModelForPreTraining, BigBirdJaForMaskedLM),  # as DeBERTa-v2: pretraining is masked-LM
    (AutoModelForTextEncoding, BigBirdJaModel),
    (AutoModelForQuestionAnswering, BigBirdJaForQuestionAnswering),
    (AutoModelForSequenceClassification, BigBirdJaForSequenceClassification),
    (AutoModelForMultipleChoice, BigBirdJaForMultipleChoice),
    (AutoModelForTokenClassification, BigBirdJaForTokenClassification),
):
    _auto.register(BigBirdJaConfig, _model, exist_ok=True)
register_pipeline()
register_remote_code()

__all__ = [
    "BigBirdJaConfig", "BigBirdJaForMaskedLM", "BigBirdJaForMultipleChoice", "BigBirdJaForQuestionAnswering",
    "BigBirdJaForSequenceClassification", "BigBirdJaForTokenClassification", "BigBirdJaModel",
    "BigBirdJaPreTrainedModel", "LongDocumentQuestionAnsweringPipeline", "QA_TASK", "attention_mask",
    "disentangled_attention",
]
