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

from . import losses

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


class TaskLoss:
    """The model's task loss per part (causal LM cross-entropy of ``labels``, or the HF head's loss)."""

    name = "task-loss"

    def targets(self, model: nn.Module) -> tuple[str, ...]:
        return losses.target_keys(model)

    def __call__(self, model: nn.Module, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        return losses.loss_terms(model, outputs, {k: batch[k] for k in self.targets(model)})


TASK_LOSS = TaskLoss()


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    return outputs[0]


def _candidate_ce(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    logits = _logits(outputs)
    label = batch["candidate_label"].to(logits.device)
    if "candidate_tokens" in batch:  # one row per example: the candidates are single tokens
        last = batch["attention_mask"].sum(dim=1).to(logits.device) - 1
        rows = logits[torch.arange(len(last), device=logits.device), last].float()
        tokens = batch["candidate_tokens"].to(logits.device)
        scores = torch.log_softmax(rows, dim=-1).gather(-1, tokens.expand(len(rows), -1))
    else:  # one row per (example, candidate): the mean log-probability of the candidate's tokens
        sums, counts = _row_logprobs(logits, batch["labels"].to(logits.device))
        per_row = sums / counts.clamp_min(1)
        scores = per_row.view(len(label), -1)
    return -torch.log_softmax(scores.double(), dim=-1).gather(-1, label.view(-1, 1)).squeeze(-1)


def _row_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = labels[:, 1:]
    rows, positions = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
    picked = torch.log_softmax(logits[rows, positions].float(), dim=-1).gather(
        -1, targets[rows, positions].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(labels.shape[0], device=logits.device, dtype=torch.float64).index_add_(0, rows, picked.double())
    return sums, torch.bincount(rows, minlength=labels.shape[0]).double()


candidate_cross_entropy = Objective(_candidate_ce, ("labels", "candidate_label", "candidate_tokens"),
                                    "candidate-cross-entropy")
"""MeZO's train-as-classification loss: cross-entropy over the task's candidates only.

Each candidate is scored by the mean log-probability of its tokens after the prompt (the evaluation's
score), and the loss is ``-log softmax(scores)[correct]`` per example. Two batch layouts:

* single-token candidates shared by the batch: one right-padded prompt row per example,
  ``candidate_tokens`` (1, C) and ``candidate_label`` (B,); scored at each row's last real token;
* otherwise: one row per (example, candidate), example-major, every row with the same number C of
  candidates, ``labels`` marking each candidate's tokens and ``candidate_label`` (B,).

``zo2.tasks.PromptEncoder.classification_batch`` builds either."""
