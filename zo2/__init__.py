"""zo2: zeroth-order (MeZO and successors) fine-tuning with block offloading, for any HF decoder model.

Native API::

    engine = zo2.ZOEngine(model, zo2.ZOConfig(method="mezo-sgd", lr=1e-6, eps=1e-3, working_device="cuda"))
    result = engine.step({"input_ids": ids, "labels": ids})   # StepResult(loss, projected_grad, ...)
    engine.flush(); output = engine.forward(input_ids=ids)

ZO2-compatible API: ``zo_hf_init``, ``model.zo_init(cfg)``, ``model.zo_train()``, ``model.zo_eval()``.
Methods: :data:`METHODS` (:mod:`zo2.methods`); objectives: :mod:`zo2.objectives`.
"""
import warnings

from .config import ZOConfig, ZOConfigError
from .engine import ZOEngine, replay
from .hf import attach_zo_methods, zo_hf_init
from .methods import METHODS
from .model.huggingface.opt import (
    get_opt_for_causalLM,
    get_opt_for_question_answering,
    get_opt_for_sequence_classification,
)
from .model.nanogpt.mezo_sgd import get_nanogpt_mezo_sgd
from .objectives import Objective, candidate_cross_entropy, objective
from .result import StepResult
from .units.partition import UnsupportedModelError, find_partition
from .updates.log import Update, UpdateLog
from .walk.batching import BatchLayoutError
from .walk.role import Role

__all__ = ["ZOConfig", "ZOConfigError", "ZOEngine", "Role", "StepResult", "Update", "UpdateLog", "replay",
           "zo_hf_init", "attach_zo_methods", "find_partition", "UnsupportedModelError", "BatchLayoutError",
           "METHODS", "Objective", "objective", "candidate_cross_entropy", "ZOTrainer", "ZOSFTTrainer",
           "get_opt_for_causalLM", "get_opt_for_sequence_classification", "get_opt_for_question_answering",
           "get_nanogpt_mezo_sgd"]
__version__ = "0.1.0"

_LAZY_TRAINERS = ("ZOTrainer", "ZOSFTTrainer")
_DEPRECATED = {"DualForwardError": BatchLayoutError}


def __getattr__(name: str):
    """``zo2.ZOTrainer`` / ``zo2.ZOSFTTrainer`` load transformers.Trainer / trl only when first used; old names
    still resolve, with a DeprecationWarning."""
    if name in _LAZY_TRAINERS:
        from . import trainer
        return getattr(trainer, name)
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"zo2.{name} is deprecated: use zo2.{new.__name__}", DeprecationWarning, stacklevel=2)
        return new
    raise AttributeError(f"module 'zo2' has no attribute {name!r}")
