"""Objectives: what a zeroth-order step minimises, computed per part of a walk from that part's outputs.

An objective is ``fn(outputs, batch)``: ``outputs`` is one part's model output (a ``ModelOutput`` with
``logits``, a tensor, or a tuple: whatever the model returns, cut to that part's rows) and ``batch`` the
whole (micro-)batch given to the step, targets included. It returns either

* a 1-D tensor of per-example losses (their sum and count are accumulated), or
* a Python tuple ``(sum, count)`` (e.g. summed token losses and the number of tokens).

It runs under ``torch.no_grad``: nothing needs to be differentiable, so accuracies, rewards, exact
match or F1 against references work as well as cross-entropies. The batch keys an objective reads but
the model must not see (labels, references, candidate ids, ...) are its ``targets``: they are taken out
of the model's inputs. Wrap a function with :func:`objective` to name them.

Built in: :data:`TASK_LOSS` (the Hugging Face head's own loss, per part: the default) and
:func:`candidate_cross_entropy` (MeZO's train-as-classification loss over a task's candidates).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .task_loss import TASK_LOSS, split_targets

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Objective:
    """``fn(outputs, batch) -> per-example losses | (sum, count)`` and the batch keys it reads as targets."""

    fn: Callable[[Any, Mapping[str, Any]], Any]
    targets: tuple[str, ...] = ()
    """Batch keys that are not model inputs (taken out of what the model is called with)."""
    name: str = ""

    def __call__(self, outputs: Any, batch: Mapping[str, Any]) -> Any:
        return self.fn(outputs, batch)


def objective(fn: Callable | None = None, *, targets: tuple[str, ...] = ("labels",), name: str = ""):
    """Make an :class:`Objective` of ``fn`` (also usable as a decorator: ``@objective(targets=(...))``)."""
    def make(inner: Callable) -> Objective:
        return Objective(inner, tuple(targets), name or getattr(inner, "__name__", "objective"))
    return make(fn) if fn is not None else make


def as_objective(value: Objective | Callable | None) -> Objective | None:
    """``None`` stays None (the task loss); a plain callable reads ``labels`` as its target."""
    if value is None or isinstance(value, Objective):
        return value
    if not callable(value):
        raise TypeError(f"an objective must be callable as fn(outputs, batch), got {type(value).__name__}")
    return objective(value)


def terms(value: Any, where: str) -> torch.Tensor:
    """An objective's return value as a float64 (sum, count) pair on the CPU."""
    if isinstance(value, tuple) and len(value) == 2:
        total, count = (torch.as_tensor(v, dtype=torch.float64).detach().cpu().reshape(()) for v in value)
        return torch.stack((total, count))
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return torch.stack((value.detach().double().sum().cpu(), torch.tensor(float(value.numel()),
                                                                             dtype=torch.float64)))
    raise TypeError(f"{where} returned {type(value).__name__}"
                    + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else "")
                    + "; an objective returns a 1-D tensor of per-example losses or a tuple (sum, count)")


def split_batch(model: nn.Module, batch: Mapping[str, Any], chosen: Objective | None
                ) -> tuple[dict[str, Any], Callable[[Any], torch.Tensor]]:
    """(model inputs, terms of one part's output) for ``batch`` under the objective ``chosen``.

    The objective's target keys are taken out of what the model sees; ``None`` is the model's task loss
    (:data:`~zo2.objectives.task_loss.TASK_LOSS`), whose targets depend on the model's head."""
    if chosen is None:
        inputs, targets = split_targets(model, batch)
        return inputs, lambda outputs: TASK_LOSS(model, outputs, targets)
    inputs = {k: v for k, v in batch.items() if k not in chosen.targets}
    return inputs, lambda outputs: terms(chosen(outputs, batch), f"objective {chosen.name!r}")
