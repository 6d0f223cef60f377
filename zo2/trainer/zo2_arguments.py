"""ZO2's trainer conventions on zo2's trainers: the learning rate of a model that carries a ZOConfig,
``tokenizer=``, and ZOSFTTrainer's ``dataset_text_field=`` / ``max_seq_length=``."""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

from ..engine import ZOEngine

logger = logging.getLogger(__name__)


def engine_lr(engine: ZOEngine) -> float:
    """The learning rate the engine trains at when nothing overrides it (the one place trainers read it)."""
    if engine.lr is None:
        raise ValueError("ZOConfig.lr='auto' needs its search before a trainer runs: call "
                         "zo2.tuning.search_lr(model.zo_engine, batches, validation) first, or give ZOConfig a number")
    return engine.lr


def follow_model_lr(args: Any, engine: ZOEngine) -> None:
    """ZO2's rule: a model that carries a ZOConfig (``model.zo_init``) trains at that config's lr, so
    ``args.learning_rate`` (which Trainer's schedulers scale) is set to it. A learning rate set in
    TrainingArguments that disagrees is named in a warning; one left at its default is replaced silently."""
    lr = engine_lr(engine)
    default = type(args).__dataclass_fields__["learning_rate"].default
    if args.learning_rate not in (default, lr):
        logger.warning("TrainingArguments.learning_rate=%g differs from the model's ZOConfig.lr=%g: training at "
                       "ZOConfig.lr=%g (ZO2's rule for a model initialised with model.zo_init). Set ZOConfig.lr to "
                       "change it", args.learning_rate, lr, lr)
    args.learning_rate = lr


def map_tokenizer(kwargs: dict[str, Any]) -> None:
    """``tokenizer=`` (ZO2's README, transformers 4) becomes ``processing_class=``, with a FutureWarning."""
    if "tokenizer" not in kwargs:
        return
    if kwargs.get("processing_class") is not None:
        raise ValueError("pass either tokenizer= or processing_class=, not both (tokenizer= is the old name)")
    warnings.warn("tokenizer= is deprecated in transformers 5: pass processing_class= instead", FutureWarning,
                  stacklevel=4)
    kwargs["processing_class"] = kwargs.pop("tokenizer")


#: ZOSFTTrainer keyword (TRL < 0.12, as ZO2 passes them) -> the SFTConfig field that holds it now.
SFT_KEYWORDS = {"dataset_text_field": "dataset_text_field", "max_seq_length": "max_length"}


def map_sft_keywords(args: Any, kwargs: dict[str, Any], config_class: type) -> Any:
    """Move ZO2's ZOSFTTrainer keywords into the SFTConfig (``max_seq_length`` is now ``max_length``) and
    return it; plain TrainingArguments become an SFTConfig with the same values first."""
    given = {SFT_KEYWORDS[k]: kwargs.pop(k) for k in list(kwargs) if k in SFT_KEYWORDS}
    if not given:
        return args
    if args is None:
        raise ValueError(f"pass args=SFTConfig(output_dir=...) with {sorted(given)} (TRL's SFTConfig holds them)")
    if not isinstance(args, config_class):
        names = {f.name for f in dataclasses.fields(config_class) if f.init}
        args = config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)
                               if f.init and f.name in names})
    for name, value in given.items():
        setattr(args, name, value)
    return args
