"""``get_nanogpt_mezo_sgd(config)``: ZO2's nanoGPT trained with MeZO-SGD (or any zo2 method) by a ZOEngine.

    model = get_nanogpt_mezo_sgd(zo_config)(GPTConfigs.gpt2, zo_config)
    loss = model(idx, pos, targets)          # one ZO step (training mode, the default)
    model.zo_eval(); logits, loss = model(idx, pos, targets)

ZO2 returns one class for offloaded (``zo2=True``) and one for resident training; here both are the
same class, and ``ZOConfig.zo2`` decides the placement.
"""
from __future__ import annotations

import types
from typing import Any

import torch

from ...config import ZOConfig
from ...engine import ZOEngine
from ...hf import ZO2OptimizerView
from ...objectives.base import objective
from ...objectives.task_loss import causal_lm_terms
from .model import GPT, GPTConfig


@objective(targets=("targets",), name="next-token-cross-entropy")
def next_token_loss(outputs: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """ZO2's nanoGPT training loss: position t's logits predict ``targets[t + 1]`` (mean over tokens)."""
    total, count = causal_lm_terms(outputs[0], batch["targets"].to(outputs[0].device))
    return total, count


class ZOGPT(GPT):
    """A :class:`~zo2.model.nanogpt.model.GPT` whose weights a :class:`~zo2.ZOEngine` owns from construction.

    Calling it in training mode (``zo_train()``, the default) runs one ZO step on ``(idx, pos, targets)``
    and returns the +eps loss; in ``zo_eval()`` mode it returns the GPT's ``(logits, loss)``. ``model.opt``
    reads the last step (``projected_grad``, ``zo_random_seed``, ``lr``)."""

    def __init__(self, config: GPTConfig, zo_config: ZOConfig) -> None:
        super().__init__(config)
        length = min(config.block_size, 4)
        probe = {"idx": torch.zeros(1, length, dtype=torch.long), "pos": torch.arange(length).unsqueeze(0)}
        self.zo_engine = ZOEngine(self, zo_config, objective=next_token_loss, probe_inputs=probe)
        self.opt = ZO2OptimizerView(self.zo_engine)
        self.zo_training = True
        self.forward = types.MethodType(ZOGPT._zo_forward, self)  # the engine keeps the GPT's own forward

    def zo_train(self) -> "ZOGPT":
        """Calls now run one ZO step each."""
        self.zo_training = True
        return self

    def zo_eval(self) -> "ZOGPT":
        """Apply pending updates; calls now return ``(logits, loss)``."""
        self.zo_engine.flush()
        self.zo_training = False
        return self

    def _zo_forward(self, idx: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        if not self.zo_training:
            return self.zo_engine.forward(idx=idx, pos=pos, targets=targets)
        if targets is None:
            raise ValueError("a ZO training step needs targets: model(idx, pos, targets)")
        return torch.tensor(self.zo_engine.step({"idx": idx, "pos": pos, "targets": targets}).loss)

    def to(self, *args: Any, **kwargs: Any) -> "ZOGPT":
        """The engine placed the weights on ``ZOConfig.working_device``; moving them elsewhere is refused."""
        values = (*args, *kwargs.values())
        target = next((a for a in values if isinstance(a, (str, torch.device))), None)
        moves = target is not None and torch.device(target).type != self.zo_engine.device.type
        if moves or any(isinstance(a, torch.dtype) for a in values):
            raise ValueError(f"the ZO engine placed this model on {self.zo_engine.device} (ZOConfig.working_device) "
                             "in its own storage: set ZOConfig.working_device / storage_dtype instead of .to()")
        return self


def get_nanogpt_mezo_sgd(config: ZOConfig) -> type[ZOGPT]:
    """ZO2's factory: the nanoGPT class to build as ``cls(gpt_config, config)`` for ``config``'s method."""
    config.validate()
    return ZOGPT
