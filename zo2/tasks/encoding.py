"""Examples -> right-padded model batches: prompt tokens, then the supervised continuation.

Prompt and continuation are tokenised separately and concatenated, so a candidate's tokens are the
same after every prompt. Only the continuation's tokens carry labels (all other positions are -100):
training minimises the cross-entropy of the correct continuation.

Truncation keeps the template and the continuation whole: a prompt too long for ``max_length`` (less
the room its continuation needs) loses characters of its text field only (``Example.text_span``: the
row's review, passage or context), from the end (``truncate="right"``, the default) or the start
(``"left"``), as many as needed and no more; the shortened prompt is tokenised again as a whole. A
prompt without a text field is cut as a whole, in tokens, from that side. A long continuation (an
instruction's response) is cut from the right, first, down to half of ``max_length`` (see
:meth:`PromptEncoder.target_ids`); plain text of an ``lm`` task keeps ``max_length - 1`` tokens.
"""
from __future__ import annotations

import logging
import statistics
from typing import Any, Literal, Mapping, Sequence

import torch

from .data import TaskError, check_columns
from .registry import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a position that the loss ignores (Hugging Face's convention)."""
TRUNCATION_SIDES = ("right", "left")
"""Which end of a too-long text field is cut: ``right`` keeps its beginning, ``left`` its end."""


def make_examples(records: Sequence[Mapping[str, Any]], task: Any) -> list[Example]:
    """The examples of ``records`` under ``task`` (anything with ``name`` and ``render(row)``). Rows the
    task drops (no usable label or text) and repeated examples are left out and counted in the log."""
    if not records:
        raise TaskError("the data has no rows")
    for column in ("text_column", "label_column", "prompt_column"):
        if getattr(task, column, None) is not None:
            check_columns(records, **{column.removesuffix("_column"): getattr(task, column)})
    check_rows = getattr(task, "check_rows", None)
    if check_rows is not None:
        check_rows(records)
    examples, seen, dropped = [], set(), 0
    for record in records:
        try:
            example = task.render(record)
        except KeyError as err:
            raise TaskError(f"task {task.name!r} needs the column {err.args[0]!r}; the data's columns are "
                            f"{list(record)}") from None
        key = example and (example.prompt, example.candidates, example.answers)
        if example is None or key in seen:
            dropped += 1
            continue
        seen.add(key)
        examples.append(example)
    if dropped:
        logger.info("dropped %d of %d rows (no usable label or text, or repeated)", dropped, len(records))
    if not examples:
        raise TaskError(f"no usable rows for task {task.name!r} among {len(records)} (check the label words and "
                        "columns)")
    return examples


class PromptEncoder:
    """Tokenises examples and pads them into right-padded batches for a causal LM."""

    def __init__(self, tokenizer: Any, max_length: int, truncate: Literal["right", "left"] = "right") -> None:
        if max_length < 2:
            raise TaskError(f"max_length={max_length} leaves no room for a prompt and a continuation; raise it")
        if truncate not in TRUNCATION_SIDES:
            raise TaskError(f"truncate={truncate!r}: expected one of {list(TRUNCATION_SIDES)}")
        self.tokenizer, self.max_length, self.truncate = tokenizer, max_length, truncate
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self._pieces: dict[str, list[int]] = {}
        self._prompts: dict[str, list[int]] = {}
        self._fitted: dict[tuple[Example, int], list[int]] = {}

    def piece_ids(self, text: str) -> list[int]:
        """Token ids of a continuation (no special tokens), cached: candidates repeat across examples."""
        if text not in self._pieces:
            self._pieces[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.max_length - 1]
        return self._pieces[text]

    def check_candidates(self, example: Example) -> None:
        """TaskError when two candidates of ``example`` tokenise to the same ids (they could not be told apart)."""
        ids = [tuple(self.piece_ids(c)) for c in example.candidates]
        if len(set(ids)) != len(ids) or not all(ids):
            raise TaskError(f"candidates {list(example.candidates)} tokenize to {[list(i) for i in ids]}: some are "
                            "empty or identical; choose other label words")

    def prompt_length(self, example: Example) -> int:
        """Tokens of the whole prompt, before any cut."""
        return len(self._tokens(example.prompt))

    def _tokens(self, prompt: str) -> list[int]:
        if prompt not in self._prompts:
            self._prompts[prompt] = self.tokenizer(prompt)["input_ids"] if prompt else []
        return self._prompts[prompt]

    def prompt_ids(self, example: Example, room: int = 0) -> list[int]:
        """Token ids of the prompt, fitted into ``max_length - room`` tokens by cutting its text field (see
        the module docstring); TaskError when the rest of the prompt alone does not fit."""
        ids = self._tokens(example.prompt)
        if len(ids) <= self.max_length - room:
            return ids
        key = (example, room)
        if key not in self._fitted:
            self._fitted[key] = self._fit(example, self.max_length - room)
        return self._fitted[key]

    def _fit(self, example: Example, keep: int) -> list[int]:
        """The prompt with the longest part of its text field that fits in ``keep`` tokens (a binary search
        over the characters kept: each candidate is tokenised whole, so the result is a real tokenisation)."""
        if example.text_span is None:
            ids = self._tokens(example.prompt)
            keep = max(keep, 1)
            return ids[:keep] if self.truncate == "right" else ids[-keep:]
        start, end = example.text_span
        before, text, after = example.prompt[:start], example.prompt[start:end], example.prompt[end:]

        def tokens(kept: int) -> list[int]:
            part = text[:kept].rstrip() if self.truncate == "right" else text[len(text) - kept:].lstrip()
            return self.tokenizer(before + part + after)["input_ids"]
        fitted = tokens(0)
        if len(fitted) > keep:
            raise TaskError(f"a prompt without its text still takes {len(fitted)} tokens (template and other fields: "
                            f"{before + after!r}), and max_length={self.max_length} leaves it {keep} (the rest is for "
                            "the answer); raise the maximum length")
        low, high = 0, len(text)  # tokens(low) fits, tokens(high) does not
        while high - low > 1:
            middle = (low + high) // 2
            ids = tokens(middle)
            if len(ids) <= keep:
                low, fitted = middle, ids
            else:
                high = middle
        return fitted

    def truncation(self, examples: Sequence[Example], room: int | None = None) -> dict[str, Any]:
        """How many of ``examples`` are cut to fit and by how many tokens: ``{"examples", "cut",
        "tokens_cut_mean", "tokens_cut_max"}``. ``room``: tokens kept free after each prompt (default: its
        longest continuation); a plain text longer than ``max_length - 1`` tokens counts as cut too.
        Raises TaskError when a prompt cannot fit even without its text."""
        cut = []
        for example in examples:
            removed = self.prompt_length(example) - len(self.prompt_ids(example, self._room(example) if room is None
                                                                         else room))
            if not example.candidates:
                full = len(self.tokenizer(example.target, add_special_tokens=False)["input_ids"])
                removed += full - len(self.target_ids(example))
            if removed:
                cut.append(removed)
        return {"examples": len(examples), "cut": len(cut), "tokens_cut_mean": statistics.fmean(cut) if cut else 0.0,
                "tokens_cut_max": max(cut, default=0)}

    def _room(self, example: Example) -> int:
        """Tokens to keep free after the prompt: the longest candidate, or the target."""
        if example.candidates:
            return max(len(self.piece_ids(c)) for c in example.candidates)
        return len(self.target_ids(example))

    def target_ids(self, example: Example) -> list[int]:
        """The supervised continuation's ids. Too long to follow the whole prompt, it is cut from the right
        to what the prompt leaves, but keeps at least half of ``max_length`` (or all it has, if less):
        beyond that the prompt's text field gives way. The prompt's template always fits before it."""
        ids = self.piece_ids(example.target)
        if not example.prompt:
            return ids
        share = max(self.max_length - self.prompt_length(example), min(len(ids), self.max_length // 2))
        if example.text_span is None:
            floor = 1
        else:
            start, end = example.text_span
            floor = len(self._tokens(example.prompt[:start] + example.prompt[end:]))
        return ids[:max(min(share, self.max_length - floor), 1)]

    def pad(self, rows: Sequence[list[int]], supervised: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-pad ``rows`` into ``input_ids``/``attention_mask``/``labels``; the last ``supervised[i]``
        tokens of row i keep their ids as labels, every other position is ``IGNORE_INDEX``."""
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, supervised)):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
            labels[i, len(row) - n:len(row)] = ids[i, len(row) - n:len(row)]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def training_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Prompt + target continuation per example; only the target's tokens are supervised (for plain
        text, with an empty prompt, every token)."""
        rows, supervised = [], []
        for example in examples:
            target = self.target_ids(example)
            prompt = self.prompt_ids(example, len(target))
            if not prompt and len(target) < 2:
                raise TaskError(f"a text of one token cannot train a causal LM: {example.target!r}")
            rows.append(prompt + target)
            supervised.append(len(target))
        return self.pad(rows, supervised)

    def shares_single_token_candidates(self, examples: Sequence[Example]) -> bool:
        """Whether every example has the same candidates and each is one token (then one forward of the
        prompt scores them all)."""
        first = examples[0].candidates
        return all(e.candidates == first for e in examples) and all(len(self.piece_ids(c)) == 1 for c in first)

    def prompt_batch(self, examples: Sequence[Example], room: int = 1) -> dict[str, torch.Tensor]:
        """The prompts alone (no labels), cut to leave ``room`` tokens."""
        batch = self.pad([self.prompt_ids(e, room) for e in examples], [0] * len(examples))
        del batch["labels"]
        return batch

    def classification_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """A batch for :data:`zo2.candidate_cross_entropy` (train as classification): the prompts with
        ``candidate_tokens`` (1, C) when every example shares single-token candidates, else one row per
        (example, candidate); ``candidate_label`` holds each example's correct candidate. Every example
        must have the same number of candidates (TaskError otherwise)."""
        counts = {len(e.candidates) for e in examples}
        if len(counts) != 1 or 0 in counts:
            raise TaskError(f"training as classification needs the same number of candidates in every example, "
                            f"got {sorted(counts)}; use the label-word LM objective (--objective lm)")
        label = torch.tensor([e.label for e in examples], dtype=torch.long)
        if self.shares_single_token_candidates(examples):
            tokens = torch.tensor([[self.piece_ids(c)[0] for c in examples[0].candidates]], dtype=torch.long)
            return {**self.prompt_batch(examples), "candidate_tokens": tokens, "candidate_label": label}
        return {**self.candidate_batch(examples), "candidate_label": label}

    def candidate_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Rows example-major, one per (example, candidate): prompt + candidate, the candidate supervised."""
        rows, supervised = [], []
        for example in examples:
            prompt = self.prompt_ids(example, self._room(example))
            for candidate in example.candidates:
                ids = self.piece_ids(candidate)
                rows.append(prompt + ids)
                supervised.append(len(ids))
        return self.pad(rows, supervised)
