"""MeZO's train-as-classification loss: cross-entropy over a task's candidate answers only."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import IGNORE_INDEX, Objective


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
