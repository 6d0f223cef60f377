"""Ctrl-C during a finetune run: stop at the next safe point instead of dying mid-step.

The first SIGINT only sets a flag: training stops after the current step (evaluation between two of
its batches), the run saves a checkpoint and says how to resume. Raising inside a step could land
while a unit's pending update is half applied, so the flag is read only where the engine's state is
whole. A second SIGINT raises KeyboardInterrupt at once: the step is abandoned and nothing more is
saved (the checkpoints already on disk are complete: they are written atomically).
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StopRequested(Exception):
    """Raised between evaluation batches once Ctrl-C was pressed: the evaluation is abandoned."""


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C; :meth:`describe` is the one line the command prints (exit code 130)."""

    def __init__(self, step: int, steps: int, saved: Path | None, *, resumable: bool, abandoned: bool = False,
                 latest: Path | None = None) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.steps, self.saved, self.resumable = step, steps, saved, resumable
        self.abandoned, self.latest = abandoned, latest

    def describe(self, command: str) -> str:
        """What was saved and how to continue; ``command`` is the command line that started the run."""
        resume = f"resume with: {command}" + ("" if " --resume" in f" {command}" else " --resume")
        if self.abandoned:
            where = (f"; the newest checkpoint is {self.latest}: {resume}" if self.latest and self.resumable else "")
            return f"interrupted twice: quit at once, the state after step {self.step} was not saved{where}"
        head = f"interrupted at step {self.step} of {self.steps}"
        if self.saved is None:
            return head + ("; nothing saved (pass --output-dir to keep checkpoints)" if self.step else
                           "; nothing trained, nothing saved")
        if not self.resumable:
            return f"{head}; the weights of step {self.step} are in {self.saved} (first-order runs do not resume)"
        return f"{head}; saved {self.saved}; {resume}"


class StopGuard:
    """Context manager that turns the first Ctrl-C into :attr:`requested` and the second into
    KeyboardInterrupt. Outside the main thread (where signals cannot be handled) it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            # None: the previous handler was not installed from Python (restore the default then)
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: stopping after the current step and saving (press Ctrl-C again to quit at once, "
                       "without saving)")

    def checked(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, raising StopRequested before the next one once a stop was requested."""
        for item in items:
            if self.requested:
                raise StopRequested
            yield item
