"""Examples -> right-padded model batches: prompt tokens, then the supervised continuation.

Prompt and continuation are tokenised separately and concatenated, so a candidate's tokens are the
same after every prompt. Only the continuation's tokens carry labels (all other positions are -100):
training minimises the cross-entropy of the correct continuation. Prompts too long for ``max_length``
are cut from the left (the end of a template, which asks the question, is kept); continuations longer
than ``max_length - 1`` tokens are cut from the right.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from .data import TaskError, check_columns
from .registry import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a position that the loss ignores (Hugging Face's convention)."""


def make_examples(records: Sequence[Mapping[str, Any]], task: Any) -> list[Example]:
    """The examples of ``records`` under ``task`` (anything with ``name`` and ``render(row)``). Rows the
    task drops (no usable label or text) and repeated examples are left out and counted in the log."""
    if not records:
        raise TaskError("the data has no rows")
    for column in ("text_column", "label_column", "prompt_column"):
        if getattr(task, column, None) is not None:
            check_columns(records, **{column.removesuffix("_column"): getattr(task, column)})
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

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if max_length < 2:
            raise TaskError(f"max_length={max_length} leaves no room for a prompt and a continuation; raise it")
        self.tokenizer, self.max_length = tokenizer, max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self._pieces: dict[str, list[int]] = {}

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

    def prompt_ids(self, example: Example, room: int = 0) -> list[int]:
        """Token ids of the prompt, cut from the left to leave ``room`` tokens (at least one prompt token)."""
        ids = self.tokenizer(example.prompt)["input_ids"] if example.prompt else []
        keep = max(self.max_length - room, 1)
        return ids[-keep:] if ids else ids

    def _room(self, example: Example) -> int:
        """Tokens to keep free after the prompt: the longest candidate, or the target."""
        if example.candidates:
            return max(len(self.piece_ids(c)) for c in example.candidates)
        return len(self.piece_ids(example.target))

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
            target = self.piece_ids(example.target)
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
