"""ZOSFTTrainer: TRL's ``SFTTrainer`` training with zeroth-order (MeZO) steps.

    trainer = ZOSFTTrainer(model, args=SFTConfig(...), zo_config=ZOConfig(...), train_dataset=dataset,
                           processing_class=tokenizer)

TRL prepares the data (tokenization, chat templates, completion-only labels) as usual; the hooks of
:class:`zo2.trainer.hf_transformers.ZOTrainerMixin` replace the backward pass with ZO steps. Needs
``pip install zo2[trl]``.
"""
from __future__ import annotations

from typing import Any

from trl import SFTConfig, SFTTrainer

from ..hf_transformers.trainer import ZOTrainerMixin
from ..zo2_arguments import map_sft_keywords


class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with zeroth-order steps; same arguments plus ``zo_config: ZOConfig``.

    Padding-free batches (``padding_free=True`` or BFD packing) are refused: the engine evaluates both
    perturbations in one forward over a doubled batch of padded rows. ZO2's keywords ``dataset_text_field=``
    and ``max_seq_length=`` are moved into the SFTConfig (as ``dataset_text_field`` and ``max_length``)."""

    def __init__(self, model: Any, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        args = map_sft_keywords(args, kwargs, SFTConfig)
        super().__init__(model, args, *rest, **kwargs)
        if self.padding_free:
            raise ValueError("ZOSFTTrainer needs padded batches: set SFTConfig.padding_free=False and, with "
                             "packing=True, packing_strategy='wrapped'")
