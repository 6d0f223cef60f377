"""``ZOTrainer`` (``transformers.Trainer`` with ZO steps), at ZO2's paths ``zo2.trainer.hf_transformers`` and
``zo2.trainer.hf_transformers.trainer``."""
from .trainer import ZOOptimizer, ZOTrainer, ZOTrainerMixin

__all__ = ["ZOOptimizer", "ZOTrainer", "ZOTrainerMixin"]
