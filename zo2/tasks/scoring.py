"""Evaluation: candidate scoring (accuracy), greedy answers (exact match / F1), held-out LM loss.

Every function takes ``forward(batch) -> output with .logits`` for a dict of CPU tensors, so the same
code evaluates through ``ZOEngine.forward``, a plain model or a stub.
"""
from __future__ import annotations

import collections
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from .encoding import IGNORE_INDEX, PromptEncoder
from .registry import Example

Forward = Callable[[dict[str, torch.Tensor]], Any]


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation: ``accuracy``/``loss`` (classification), ``exact_match``/``f1``
    (generation) or ``loss``/``perplexity`` (lm)."""

    metrics: dict[str, float]
    size: int
    predicted: tuple[int, ...] = ()
    """Classification with fixed label words: how many examples were assigned to each class."""
    outputs: tuple[str, ...] = field(default=(), repr=False)
    """Generation: the answers produced, in example order."""
    per_example: tuple[float, ...] = field(default=(), repr=False)
    """The metric of each example, in example order (1.0/0.0 for accuracy, the F1 of each answer), so two
    evaluations of the same examples can be compared pairwise (:func:`paired_gain`); empty for ``lm``."""

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, (summed log-probability, count) of the supervised tokens (``labels != IGNORE_INDEX``,
    shifted as in causal LM training: position t predicts label t + 1)."""
    targets = labels[:, 1:].to(logits.device)
    rows, positions = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
    logp = torch.log_softmax(logits[rows, positions].float(), dim=-1)
    picked = logp.gather(-1, targets[rows, positions].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(labels.shape[0], device=logits.device).index_add_(0, rows, picked)
    counts = torch.bincount(rows, minlength=labels.shape[0])
    return sums.cpu(), counts.cpu()


def _by_prompt_length(encoder: PromptEncoder, examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Example indices in chunks of ``batch_size``, sorted by prompt length to limit padding."""
    order = sorted(range(len(examples)), key=lambda i: encoder.prompt_length(examples[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _last_logits(forward: Forward, batch: dict[str, torch.Tensor], select_logits: bool) -> torch.Tensor:
    """(B, V) next-token logits at each right-padded row's last real token. With ``select_logits`` the
    model projects only those positions (``logits_to_keep`` of shape (B, 1), transformers >= 5.x)."""
    last = batch["attention_mask"].sum(dim=1) - 1
    if select_logits:
        logits = forward({**batch, "logits_to_keep": last.unsqueeze(1)}).logits
        return logits[:, 0]
    logits = forward(batch).logits
    return logits[torch.arange(len(last), device=logits.device), last.to(logits.device)]


def candidate_scores(forward: Forward, encoder: PromptEncoder, examples: Sequence[Example], batch_size: int, *,
                     select_logits: bool = False, progress: Callable[[Iterator], Iterator] = iter) -> list[torch.Tensor]:
    """Per example, the mean log-probability per token of each candidate after its prompt (MeZO's score;
    for one-token candidates it is the log-probability). Chunks whose examples share one-token
    candidates take one forward of the prompts; others one row per (example, candidate)."""
    scores: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    for index in progress(_by_prompt_length(encoder, examples, batch_size)):
        chunk = [examples[i] for i in index]
        for example in chunk:
            encoder.check_candidates(example)
        if encoder.shares_single_token_candidates(chunk):
            logits = _last_logits(forward, encoder.prompt_batch(chunk), select_logits)
            tokens = torch.tensor([encoder.piece_ids(c)[0] for c in chunk[0].candidates], device=logits.device)
            picked = torch.log_softmax(logits.float(), dim=-1)[:, tokens].cpu()
            for row, i in enumerate(index):
                scores[i] = picked[row]
        else:
            batch = encoder.candidate_batch(chunk)
            sums, counts = token_logprobs(forward(batch).logits, batch["labels"])
            means = (sums / counts).split([len(e.candidates) for e in chunk])
            for i, mean in zip(index, means):
                scores[i] = mean
    return scores


def evaluate_candidates(forward: Forward, encoder: PromptEncoder, examples: Sequence[Example], batch_size: int,
                        **options: Any) -> EvalResult:
    """Accuracy of choosing each example's most likely candidate; ``loss`` is the mean negative
    log-probability per token of the correct candidate."""
    scores = candidate_scores(forward, encoder, examples, batch_size, **options)
    predictions = [int(s.argmax()) for s in scores]
    correct = sum(p == e.label for p, e in zip(predictions, examples))
    loss = -sum(float(s[e.label]) for s, e in zip(scores, examples)) / len(examples)
    fixed = all(e.candidates == examples[0].candidates for e in examples)
    counts = tuple(predictions.count(k) for k in range(len(examples[0].candidates))) if fixed else ()
    hits = tuple(float(p == e.label) for p, e in zip(predictions, examples))
    return EvalResult({"accuracy": correct / len(examples), "loss": loss}, len(examples), counts, per_example=hits)


# ------------------------------------------------------------------------------------ generation
def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(prediction: str, reference: str) -> float:
    """Token-level F1 between normalised answers (SQuAD)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def greedy_answers(forward: Forward, encoder: PromptEncoder, examples: Sequence[Example], batch_size: int, *,
                   max_new_tokens: int = 32, select_logits: bool = False,
                   progress: Callable[[Iterator], Iterator] = iter) -> list[str]:
    """Greedy continuation of each prompt up to a newline, the end-of-sequence token or ``max_new_tokens``,
    stripped. Each new token re-runs the whole (short) sequence: no KV cache, so it works through any
    forward, offloaded or not."""
    eos = encoder.tokenizer.eos_token_id
    answers = [""] * len(examples)
    for index in progress(_by_prompt_length(encoder, examples, batch_size)):
        rows = [encoder.prompt_ids(examples[i], max_new_tokens) for i in index]
        new: list[list[int]] = [[] for _ in index]
        done = [False] * len(index)
        for _ in range(max_new_tokens):
            batch = encoder.pad([r + n for r, n in zip(rows, new)], [0] * len(rows))
            del batch["labels"]
            tokens = _last_logits(forward, batch, select_logits).argmax(dim=-1).tolist()
            for k, token in enumerate(tokens):
                if not done[k]:
                    new[k].append(token)
                    done[k] = token == eos or "\n" in encoder.tokenizer.decode(new[k]).lstrip()
            if all(done):
                break
        for i, ids in zip(index, new):
            text = encoder.tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
            answers[i] = text.strip().split("\n")[0].strip()
    return answers


def evaluate_generation(forward: Forward, encoder: PromptEncoder, examples: Sequence[Example], batch_size: int,
                        **options: Any) -> EvalResult:
    """Exact match and F1 of greedy answers, each against the best-matching reference (SQuAD scoring)."""
    answers = greedy_answers(forward, encoder, examples, batch_size, **options)
    em = sum(max(float(normalize_answer(a) == normalize_answer(r)) for r in e.answers) for a, e in zip(answers, examples))
    f1s = tuple(max(answer_f1(a, r) for r in e.answers) for a, e in zip(answers, examples))
    return EvalResult({"exact_match": em / len(examples), "f1": sum(f1s) / len(examples)}, len(examples),
                      outputs=tuple(answers), per_example=f1s)


# ---------------------------------------------------------------------------------- paired gain
@dataclass(frozen=True)
class PairedGain:
    """The mean per-example difference between two evaluations of the same examples, with its standard
    error: ``gain ± 1.96 se`` is a normal-approximation 95% interval for the gain on examples like these."""

    gain: float
    se: float
    size: int

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """``(gain - z se, gain + z se)``; the default z gives a two-sided 95% interval."""
        return self.gain - z * self.se, self.gain + z * self.se


def paired_gain(before: Sequence[float], after: Sequence[float]) -> PairedGain:
    """Gain of ``after`` over ``before`` (per-example metrics of the same examples, in the same order) and its
    paired standard error ``sd(d) / sqrt(n)``, ``d = after - before`` and ``sd`` the sample deviation (n - 1).

    Pairing removes what the two evaluations share: only the examples whose score changed contribute, so
    a gain far smaller than the unpaired error of either accuracy (~2.4 points at 80% on 300 examples)
    can still be told from noise. One example has no spread to measure: its error is ``nan``."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_gain needs two non-empty evaluations of the same examples; got {len(before)} and "
                         f"{len(after)} values")
    diffs = [float(a) - float(b) for a, b in zip(after, before)]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else math.nan
    return PairedGain(mean, se, n)


# --------------------------------------------------------------------------------------- LM loss
def evaluate_lm(forward: Forward, encoder: PromptEncoder, examples: Sequence[Example], batch_size: int, *,
                progress: Callable[[Iterator], Iterator] = iter, **_: Any) -> EvalResult:
    """Held-out cross-entropy per supervised token (all tokens of plain text; the response of
    instruction data) and its perplexity."""
    total, count = 0.0, 0
    for index in progress(_by_prompt_length(encoder, examples, batch_size)):
        batch = encoder.training_batch([examples[i] for i in index])
        sums, counts = token_logprobs(forward(batch).logits, batch["labels"])
        total, count = total - float(sums.double().sum()), count + int(counts.sum())
    loss = total / max(count, 1)
    return EvalResult({"loss": loss, "perplexity": math.exp(min(loss, 700.0))}, len(examples))


EVALUATORS: dict[str, Callable[..., EvalResult]] = {
    "classification": evaluate_candidates, "generation": evaluate_generation, "lm": evaluate_lm}
"""Task kind -> evaluation function."""


def evaluate(kind: str, forward: Forward, encoder: PromptEncoder, examples: Sequence[Example], batch_size: int,
             **options: Any) -> EvalResult:
    """Evaluate ``examples`` the way tasks of ``kind`` are scored (see :data:`EVALUATORS`)."""
    if not examples:
        raise ValueError("nothing to evaluate: the eval set is empty")
    if kind != "generation":
        options.pop("max_new_tokens", None)
    return EVALUATORS[kind](forward, encoder, examples, batch_size, **options)
