"""The learning rate of a finetune run: ``--lr auto``'s search before training (its table printed, logged,
stored in the engine state, hence in checkpoints and summary.json) and ``--average-last``'s averaged
weights after it.

The search trains its candidates on the training pool less a validation slice carved from it (never the
eval set) and scores them with the run's objective; its seconds count as training time, so they are
charged to ``--max-seconds`` and ``--max-run-seconds``. A resumed run whose checkpoint holds a searched lr
does not search again.
"""
from __future__ import annotations

import logging
import math

from ...methods.defaults import defaults_for
from ...objectives.classification import candidate_cross_entropy
from ...tasks import Example, TaskError, training_batch
from ...tuning import GRID, LRSearchError, LRSearchInterrupted, averaged, carve_validation, search_lr, search_steps
from ...tuning.lr_search import MIN_VALIDATION
from .folders import save_model_folder
from .interrupt import StopRequested
from .job import Run

logger = logging.getLogger(__name__)

VALIDATION_SHARE = 0.1
"""Share of the training pool set aside to score the candidates (at least MIN_VALIDATION examples)."""


def _batch(run: Run, examples: list[Example]) -> dict:
    classify = run.objective == "classification"
    return run.encoder.classification_batch(examples) if classify else run.encoder.training_batch(examples)


def search_if_asked(run: Run) -> None:
    """``--lr auto`` on a run that has not searched yet: search, charge its time to the budgets, log the table."""
    engine, args = run.engine, run.args
    if engine is None:
        return
    if engine.lr is not None:  # given, a method default, or searched before a resume
        run.resolved["lr"] = engine.lr
        return
    size = max(MIN_VALIDATION, math.ceil(VALIDATION_SHARE * len(run.data.train)))
    try:
        pool, validation = carve_validation(run.data.train, size, args.seed, keep=args.batch_size)
    except LRSearchError as err:
        raise TaskError(f"--lr auto: {err}") from None
    batches = [_batch(run, validation[i:i + args.eval_batch_size])
               for i in range(0, len(validation), args.eval_batch_size)]
    left = [limit - spent for limit, spent in ((args.max_seconds, run.train_seconds),
                                               (args.max_run_seconds, run.run_seconds)) if limit]
    objective = candidate_cross_entropy if run.objective == "classification" else None
    logger.info("--lr auto: screening %d candidate lrs around %g, %d steps each, then confirming the best over longer "
                "trials (at most %d steps in all), scored on %d held-back training examples", len(GRID),
                defaults_for(run.config.method).lr, args.lr_search_steps, search_steps(args.lr_search_steps),
                len(validation))
    try:
        result = search_lr(engine, lambda step: _batch(run, training_batch(pool, args.batch_size, args.seed, step)),
                           batches, steps=args.lr_search_steps, objective=objective,
                           max_seconds=min(left) if left else None, should_stop=lambda: run.guard.requested)
    except LRSearchInterrupted:
        raise StopRequested from None
    except LRSearchError as err:
        raise TaskError(f"--lr auto: {err}") from None
    run.train_seconds += result.seconds
    run.run_seconds += result.seconds
    run.resolved["lr"] = result.lr
    logger.info("%s\n--lr auto picked %g (%d forward passes, %.1f s, charged to the time budgets)", result.describe(),
                result.lr, result.forward_passes, result.seconds)


def average_if_asked(run: Run) -> None:
    """``--average-last``: once the last iterate is saved, average the last iterates, evaluate them and save
    them to ``averaged/``; the engine holds the last iterate again afterwards (as the checkpoint does)."""
    if run.engine is None or not run.config.average_last or run.step == 0 or run.stop_reason == "interrupted":
        return
    with averaged(run.engine) as k:
        run.averaged = k
        run.evaluate(keep_best=False)
        run.evals[-1]["averaged_last"] = k
        if run.output is not None:  # a plain model folder: the checkpoint (for --resume) keeps the last iterate
            run.averaged_dir = run.output / "averaged"
            save_model_folder(run.model, run.tokenizer, run.averaged_dir)
