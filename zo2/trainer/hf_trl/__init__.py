"""``ZOSFTTrainer`` (TRL's ``SFTTrainer`` with ZO steps), at ZO2's paths ``zo2.trainer.hf_trl`` and
``zo2.trainer.hf_trl.sft_trainer``."""
from .sft_trainer import ZOSFTTrainer

__all__ = ["ZOSFTTrainer"]
