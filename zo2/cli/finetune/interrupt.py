"""Ctrl-C, SIGTERM or SIGHUP during a finetune run: stop at the next safe point instead of dying mid-step.

The first stop signal only sets a flag: training stops after the current step (evaluation between two
of its batches), the run saves a checkpoint and says how to resume. SIGTERM (what ``kill``, ``timeout``,
Slurm and Kubernetes send) and SIGHUP (a closed terminal or SSH session) are handled like Ctrl-C (SIGINT).
Raising inside a step could land while a unit's pending update is half applied, so the flag is read only
where the engine's state is whole. A second signal raises KeyboardInterrupt at once: the step is
abandoned and nothing more is saved (the checkpoints already on disk are complete: they are written
atomically).
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


STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
"""The signals that stop a run cleanly, with the name its messages use."""


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C, SIGTERM or SIGHUP; :meth:`describe` is the one line the command prints
    (exit code 130 for each, as for Ctrl-C)."""

    def __init__(self, step: int, steps: int, saved: Path | None, *, resumable: bool, abandoned: bool = False,
                 latest: Path | None = None, cause: str = "Ctrl-C") -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.steps, self.saved, self.resumable = step, steps, saved, resumable
        self.abandoned, self.latest, self.cause = abandoned, latest, cause

    def describe(self, command: str) -> str:
        """What was saved and how to continue; ``command`` is the command line that started the run."""
        resume = f"resume with: {command}" + ("" if " --resume" in f" {command}" else " --resume")
        if self.abandoned:
            if self.latest and self.resumable:
                return f"interrupted twice: quit at once at step {self.step}; the newest checkpoint is {self.latest}: {resume}"
            return f"interrupted twice: quit at once, the state after step {self.step} was not saved (no checkpoint yet)"
        head = ("interrupted" if self.cause == "Ctrl-C" else f"stopped by {self.cause}") + \
            f" at step {self.step} of {self.steps}"
        if self.saved is None:
            return head + ("; nothing saved (pass --output-dir to keep checkpoints)" if self.step else
                           "; nothing trained, nothing saved")
        if not self.resumable:
            return f"{head}; the weights of step {self.step} are in {self.saved} (first-order runs do not resume)"
        return f"{head}; saved {self.saved}; {resume}"


class StopGuard:
    """Context manager that turns the first stop signal (:data:`STOP_SIGNALS`) into :attr:`requested`
    and the second into KeyboardInterrupt. Outside the main thread (where signals cannot be handled) it
    does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self.cause = "Ctrl-C"
        """The name of the first stop signal received."""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            # None: the previous handler was not installed from Python (restore the default then)
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.cause = True, STOP_SIGNALS[signum]
        logger.warning("%s: stopping after the current step and saving (press Ctrl-C again to quit at once, "
                       "without saving)", self.cause)

    def checked(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, raising StopRequested before the next one once a stop was requested."""
        for item in items:
            if self.requested:
                raise StopRequested
            yield item
