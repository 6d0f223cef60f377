"""Per-half losses of the dual forward, for any Hugging Face task head.

The model never sees the targets (HF would average its loss over both halves); the engine takes
the logits of each half and applies the task's loss: shifted cross-entropy for causal LMs, and the
HF loss (transformers' ``LOSS_MAPPING``, chosen by class name as transformers chooses it) for the
other heads: ``...ForSequenceClassification``, ``...ForQuestionAnswering``, ``...ForTokenClassification``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING

#: float32 logits the causal-LM loss materialises at once (elements): it runs over chunks of positions,
#: so a 2048-token half with a 50k vocabulary never needs float32 copies of all its logits.
LOSS_CHUNK = 1 << 24


def causal_lm_terms(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(sum, count) as float64 of the next-token cross-entropy over labels != -100.

    Computed in at least float32 (float64 stays float64, so finite differences of float64 models keep
    their precision), over chunks of ``LOSS_CHUNK // vocab`` positions summed in float64."""
    vocab = logits.shape[-1]
    targets = torch.full(labels.shape, -100, dtype=torch.long, device=logits.device)
    targets[:, :-1] = labels[:, 1:]  # the last position predicts nothing
    rows, targets = logits.reshape(-1, vocab), targets.reshape(-1)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    step = max(1, LOSS_CHUNK // vocab)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, rows.shape[0], step):
        part = nn.functional.cross_entropy(rows[start:start + step].to(dtype), targets[start:start + step],
                                           ignore_index=-100, reduction="sum")
        total += part.double()
    return torch.stack((total, (targets != -100).sum().double()))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100, as float64 (see :func:`causal_lm_terms`)."""
    total, count = causal_lm_terms(logits, labels)
    return total / count


#: How to call each loss on one half: (target keys, call(loss_fn, model, output_half, targets)); the
#: causal-LM call returns (sum, count) itself, the others HF's mean loss.
_TASKS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "ForCausalLM": (("labels",), lambda fn, model, out, t: causal_lm_terms(out["logits"], t["labels"])),
    "ForSequenceClassification": (("labels",), lambda fn, model, out, t: fn(
        labels=t["labels"], pooled_logits=out["logits"], config=model.config)),
    "ForTokenClassification": (("labels",), lambda fn, model, out, t: fn(
        logits=out["logits"], labels=t["labels"], config=model.config)),
    "ForQuestionAnswering": (("start_positions", "end_positions"), lambda fn, model, out, t: fn(
        start_logits=out["start_logits"], end_logits=out["end_logits"], **t)),
}
_TASKS["ForConditionalGeneration"] = _TASKS["ForCausalLM"]


def task_of(model: nn.Module) -> str:
    """The loss family of ``model`` ("ForCausalLM", "ForSequenceClassification", ...)."""
    loss_type = getattr(model, "loss_type", None) or "ForCausalLM"
    if loss_type not in _TASKS:
        raise ValueError(f"{type(model).__name__}: zo2 has no per-half loss for loss type {loss_type!r}; "
                         f"supported: {sorted(_TASKS)}")
    return loss_type


def target_keys(model: nn.Module) -> tuple[str, ...]:
    """The batch keys the task loss of ``model`` reads as targets (``labels``, or QA's positions)."""
    return _TASKS[task_of(model)][0]


def split_targets(model: nn.Module, batch: Mapping[str, Any]) -> tuple[dict, dict]:
    """(model inputs, targets): the task's target keys are taken out of ``batch``."""
    keys, _ = _TASKS[task_of(model)]
    missing = [k for k in keys if batch.get(k) is None]
    if missing:
        raise ValueError(f"a ZO training step needs targets to compute a loss: missing {missing} in the batch "
                         f"(got keys {sorted(batch)}); for causal LMs pass labels=input_ids")
    inputs = {k: v for k, v in batch.items() if k not in keys}
    return inputs, {k: batch[k] for k in keys}


def _count(task: str, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """How many terms the task's mean loss averages: target tokens, or rows."""
    if task == "ForTokenClassification":
        return (targets["labels"] != -100).sum()
    first = next(iter(targets.values()))
    return torch.tensor(first.shape[0])


def loss_terms(model: nn.Module, output: Any, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(loss sum, count) of one side's output as a float64 pair: loss = sum / count, and sums over
    micro-batches or data-parallel shards give the loss of their union (up to float rounding).

    Causal LMs sum their token losses in chunks (:func:`causal_lm_terms`). For the other heads the sum
    is HF's mean loss times its count: for a float32 loss and fewer than 2**29 terms the product is
    exact in float64, so a single batch's loss comes back bit for bit."""
    task = task_of(model)
    _, call = _TASKS[task]
    if task in ("ForCausalLM", "ForConditionalGeneration"):
        return call(None, model, output, targets)
    mean = call(LOSS_MAPPING[task], model, output, targets).detach().double()
    count = _count(task, targets).to(mean.device, torch.float64)
    total = torch.where(count > 0, mean * count, torch.zeros_like(mean))  # no terms: contributes nothing
    return torch.stack((total, count))


class TaskLoss:
    """The model's task loss per part (causal LM cross-entropy of ``labels``, or the HF head's loss)."""

    name = "task-loss"

    def targets(self, model: nn.Module) -> tuple[str, ...]:
        return target_keys(model)

    def __call__(self, model: nn.Module, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        return loss_terms(model, outputs, {k: batch[k] for k in self.targets(model)})


TASK_LOSS = TaskLoss()
