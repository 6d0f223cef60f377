"""The classes of a labelled task: its label words, how often each is the true label, and a collapse of the
predictions onto one class (what the evaluation log and ``summary.json`` report)."""
from __future__ import annotations

import collections
from typing import Sequence

from ...tasks import Example

COLLAPSE_SHARE = 0.8
"""A class that takes at least this share of the predictions ..."""
COLLAPSE_EXCESS = 0.2
"""... and this much more than its share of the true labels is reported as a collapse."""


# ----------------------------------------------------------------------------- classes, collapse
def class_names(examples: Sequence[Example]) -> list[str] | None:
    """The label words (candidates, stripped) when every example shares them, else None."""
    if not examples or not examples[0].candidates or any(e.candidates != examples[0].candidates for e in examples):
        return None
    return [c.strip() for c in examples[0].candidates]


def label_counts(examples: Sequence[Example]) -> dict[str, int] | None:
    """How many of ``examples`` have each class as their true label (None: no shared label words)."""
    names = class_names(examples)
    if names is None:
        return None
    counts = collections.Counter(e.label for e in examples)
    return {name: counts[k] for k, name in enumerate(names)}


def collapsed_class(predicted: dict[str, int], truth: dict[str, int]) -> str | None:
    """The class that took at least ``COLLAPSE_SHARE`` of the predictions and ``COLLAPSE_EXCESS`` more
    than its share of the true labels (the model answers it whatever the input), else None."""
    total = sum(predicted.values())
    for name, count in predicted.items():
        share = count / total if total else 0.0
        if share >= COLLAPSE_SHARE and share - truth.get(name, 0) / total >= COLLAPSE_EXCESS:
            return name
    return None
