"""bigbird-ja: long-context Japanese encoders (BigBird block-sparse x DeBERTa-v2 disentangled attention).

`import bigbird_ja` registers `BigBirdJaConfig` and the models with transformers' `Auto*` classes. It imports
neither triton nor deepspeed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .attention import attention_mask, disentangled_attention
from .configuration import BigBirdJaConfig
from .modeling import (
    BigBirdJaForMaskedLM,
    BigBirdJaForMultipleChoice,
    BigBirdJaForQuestionAnswering,
    BigBirdJaForSequenceClassification,
    BigBirdJaForTokenClassification,
    BigBirdJaModel,
    BigBirdJaPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(BigBirdJaConfig.model_type, BigBirdJaConfig, exist_ok=True)
for _auto, _model in (
    (AutoModel, BigBirdJaModel),
    (AutoModelForMaskedLM, BigBirdJaForMaskedLM),
    (AutoModelForQuestionAnswering, BigBirdJaForQuestionAnswering),
    (AutoModelForSequenceClassification, BigBirdJaForSequenceClassification),
    (AutoModelForMultipleChoice, BigBirdJaForMultipleChoice),
    (AutoModelForTokenClassification, BigBirdJaForTokenClassification),
):
    _auto.register(BigBirdJaConfig, _model, exist_ok=True)

__all__ = [
    "BigBirdJaConfig", "BigBirdJaForMaskedLM", "BigBirdJaForMultipleChoice", "BigBirdJaForQuestionAnswering",
    "BigBirdJaForSequenceClassification", "BigBirdJaForTokenClassification", "BigBirdJaModel",
    "BigBirdJaPreTrainedModel", "attention_mask", "disentangled_attention",
]
