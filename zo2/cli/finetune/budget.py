"""Time budgets of a finetune run and the time left that its progress bar shows.

Both budgets count training time only: the seconds spent inside training steps, not evaluating,
saving or loading. ``--max-seconds`` is the run's total over every invocation (a resumed run has
already spent what it trained before); ``--max-run-seconds`` counts this invocation alone.

A step starts only if at least half of the median recent step time is left, so a run ends within
about half a step of its budget instead of starting a step it cannot finish in time.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

from tqdm.auto import tqdm

RECENT_STEPS = 10
"""Step times the prediction looks at (the median of the last ones: robust to a slow first step)."""
BUDGET_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
"""tqdm's default layout without its ETA (computed from --steps; the postfix shows the budget's)."""


@dataclass(frozen=True)
class TimeBudget:
    """``--max-seconds`` and ``--max-run-seconds`` (0: no limit)."""

    total: float = 0.0
    """Training seconds of the whole run, across resumes."""
    per_run: float = 0.0
    """Training seconds of this invocation."""

    @property
    def limited(self) -> bool:
        return bool(self.total or self.per_run)

    def left(self, trained: float, trained_here: float) -> tuple[float, str] | None:
        """(seconds left, the flag that binds) of the tighter budget; None without a budget."""
        options = ([(self.total - trained, "--max-seconds")] if self.total else []) + (
            [(self.per_run - trained_here, "--max-run-seconds")] if self.per_run else [])
        return min(options) if options else None

    def exhausted(self, trained: float, trained_here: float, step_seconds: Sequence[float]) -> str | None:
        """The flag whose budget stops the run before its next step, or None. Without a step time yet the
        first step always runs."""
        left = self.left(trained, trained_here)
        if left is None:
            return None
        seconds, flag = left
        if seconds <= 0 or step_seconds and statistics.median(step_seconds[-RECENT_STEPS:]) / 2 > seconds:
            return flag
        return None

    def describe_left(self, trained: float, trained_here: float, step_seconds: Sequence[float],
                      steps_left: int) -> str | None:
        """The bar's estimate of the time left: until the budget ends, or until the last step when that
        comes first; None without a budget."""
        left = self.left(trained, trained_here)
        if left is None:
            return None
        seconds, flag = left
        limit = self.total if flag == "--max-seconds" else self.per_run
        to_last = steps_left * statistics.median(step_seconds[-RECENT_STEPS:]) if step_seconds else None
        if to_last is not None and to_last < seconds:
            return f"{tqdm.format_interval(to_last)} to the last step"
        return f"{tqdm.format_interval(max(seconds, 0))} of {tqdm.format_interval(limit)} budget"
