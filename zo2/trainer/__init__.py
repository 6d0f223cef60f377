"""Trainer integrations (ZO2's paths): ``zo2.trainer.hf_transformers.ZOTrainer`` and
``zo2.trainer.hf_trl.ZOSFTTrainer`` (needs ``trl``). Imported lazily: ``import zo2`` loads neither."""
from __future__ import annotations

from typing import Any

_LAZY = {"ZOTrainer": "hf_transformers", "ZOTrainerMixin": "hf_transformers", "ZOOptimizer": "hf_transformers",
         "ZOSFTTrainer": "hf_trl"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
