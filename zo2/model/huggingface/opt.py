"""ZO2's OPT getters: ``get_opt_for_causalLM(zo_config)`` and its kin return an OPT class whose instances
have ZO2's model API (``zo_init``, ``zo_train``, ``zo_eval``, hooks; :mod:`zo2.hf`) from construction:

    model = get_opt_for_causalLM(zo_config)(OPTConfig(...))     # or .from_pretrained(path)
    model.zo_init(zo_config)
"""
from __future__ import annotations

from transformers import OPTConfig
from transformers import OPTForCausalLM as _OPTForCausalLM
from transformers import OPTForQuestionAnswering as _OPTForQuestionAnswering
from transformers import OPTForSequenceClassification as _OPTForSequenceClassification

from ...config import ZOConfig
from ...hf import attach_zo_methods


class OPTForCausalLM(_OPTForCausalLM):
    """transformers' ``OPTForCausalLM`` with ZO2's model API."""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        attach_zo_methods(self)


class OPTForSequenceClassification(_OPTForSequenceClassification):
    """transformers' ``OPTForSequenceClassification`` with ZO2's model API."""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        attach_zo_methods(self)


class OPTForQuestionAnswering(_OPTForQuestionAnswering):
    """transformers' ``OPTForQuestionAnswering`` with ZO2's model API."""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        attach_zo_methods(self)


def get_opt_for_causalLM(zo_config: ZOConfig) -> type[OPTForCausalLM]:
    """The OPT causal-LM class for ``zo_config`` (every zo2 method trains the same class)."""
    zo_config.validate()
    return OPTForCausalLM


def get_opt_for_sequence_classification(zo_config: ZOConfig) -> type[OPTForSequenceClassification]:
    """The OPT sequence-classification class for ``zo_config``."""
    zo_config.validate()
    return OPTForSequenceClassification


def get_opt_for_question_answering(zo_config: ZOConfig) -> type[OPTForQuestionAnswering]:
    """The OPT question-answering class for ``zo_config``."""
    zo_config.validate()
    return OPTForQuestionAnswering
