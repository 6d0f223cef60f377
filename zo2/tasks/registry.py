"""The task registry: how each task turns a data row into a prompt and what is scored after it.

Three kinds of task, all trained with the causal-LM loss on the tokens after the prompt:

* ``classification``: the example's candidates are scored after the prompt, the most likely one is the
  prediction (fixed label words, or per-example candidates as in COPA and ReCoRD); metric: accuracy.
* ``generation``: the model answers greedily after the prompt; metrics: exact match and F1 against the
  reference answers (SQuAD normalisation); training supervises the first reference.
* ``lm``: plain text or prompt/response data; metric: held-out loss (and perplexity).

The MeZO templates (Malladi et al., 2023, appendix; most from PromptSource) are entries of
:data:`TASKS`. Adding a task is one entry: a name, a ``render(row) -> Example`` function and where the
data lives on the Hugging Face Hub. Rows are in the schema of the Hub dataset, so local JSON/CSV/parquet
copies of it work the same way.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from .data import TaskError, blank_label

logger = logging.getLogger(__name__)

Kind = Literal["classification", "generation", "lm"]


@dataclass(frozen=True)
class Example:
    """One prompted example. ``prompt`` is followed by one of ``candidates`` (classification), by an
    answer (generation: ``answers``) or is the whole text to model (lm: ``answers[0]`` after ``prompt``)."""

    prompt: str
    candidates: tuple[str, ...] = ()
    """Continuations scored after the prompt, as appended (with their leading space or newline)."""
    label: int = -1
    """Index of the correct candidate (classification), else -1."""
    answers: tuple[str, ...] = ()
    """Reference answers (generation; the first one is the training target) or the text to model (lm)."""
    text_span: tuple[int, int] | None = None
    """(start, end) characters of the prompt's text field (the row's long text): the only part of the
    prompt that is cut when it does not fit (None: the prompt is cut as a whole)."""

    @property
    def target(self) -> str:
        """The continuation that training supervises."""
        return self.candidates[self.label] if self.candidates else self.answers[0]


def framed(before: str, text: str, after: str, candidates: tuple[str, ...] = (), label: int = -1,
           answers: tuple[str, ...] = ()) -> Example:
    """The example whose prompt is ``before + text + after``, with ``text`` as its text field (the part
    that may be cut to fit the length; the template around it is always kept whole)."""
    return Example(before + text + after, candidates, label, answers, text_span=(len(before), len(before) + len(text)))


@dataclass(frozen=True)
class TaskSpec:
    """A task: how rows become examples, how it is scored, where its data lives."""

    name: str
    kind: Kind
    render: Callable[[Mapping[str, Any]], Example | None]
    """Row -> example; None drops the row (e.g. an unlabelled test row)."""
    hub_path: str | None = None
    """Hugging Face dataset name for ``datasets.load_dataset`` (None: local files only)."""
    hub_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    answer_prefix: str = " "
    """Generation: what precedes the answer after the prompt (the answer ends at a newline)."""
    description: str = ""

    @property
    def metric(self) -> str:
        """The metric that picks the best checkpoint: accuracy, f1 (higher is better) or loss (lower)."""
        return {"classification": "accuracy", "generation": "f1", "lm": "loss"}[self.kind]


def _labelled(words: tuple[str, ...], prompt: Callable[[Mapping[str, Any]], tuple[str, str, str]]) -> Callable:
    """A renderer for a fixed label set: ``row["label"]`` indexes ``words``; rows labelled -1 are dropped.
    ``prompt(row)`` gives (before, text field, after)."""
    def render(row: Mapping[str, Any]) -> Example | None:
        label = int(row["label"])
        if not 0 <= label < len(words):
            return None
        return framed(*prompt(row), candidates=words, label=label)
    return render


def _question(text: str) -> str:
    text = text.strip()
    text = text if text.endswith("?") else text + "?"
    return text[:1].upper() + text[1:]


def _copa(row: Mapping[str, Any]) -> Example | None:
    """COPA: the premise, then "so"/"because", then each choice with a lower-case first word (but "I")."""
    premise = row["premise"].strip().removesuffix(".")
    joint = {"effect": " so", "cause": " because"}[row["question"]]

    def lower_first(choice: str) -> str:
        first, _, rest = choice.strip().partition(" ")
        return " " + " ".join(w for w in (first if first == "I" else first.lower(), rest) if w)
    label = int(row["label"])
    return None if label < 0 else framed("", premise, joint, (lower_first(row["choice1"]), lower_first(row["choice2"])),
                                         label)


def _record(row: Mapping[str, Any]) -> Example | None:
    """ReCoRD: candidates are the passage's entities; the first one among the answers is correct."""
    entities = tuple(dict.fromkeys(row["entities"]))
    correct = [i for i, e in enumerate(entities) if e in set(row["answers"])]
    if not correct:
        return None
    after = f"\n{row['query']}\nQuestion: what is the \"@placeholder\"\nAnswer:"
    return framed("", row["passage"], after, tuple(f" {e}" for e in entities), correct[0])


def _squad(row: Mapping[str, Any]) -> Example | None:
    answers = tuple(a for a in row["answers"]["text"] if a.strip())
    before, after = f"Title: {row['title']}\nContext: ", f"\nQuestion: {row['question'].strip()}\nAnswer:"
    return framed(before, row["context"], after, answers=answers) if answers else None


def _drop(row: Mapping[str, Any]) -> Example | None:
    answers = tuple(a for a in row["answers_spans"]["spans"] if a.strip())
    after = f"\nQuestion: {row['question'].strip()}\nAnswer:"
    return framed("Passage: ", row["passage"], after, answers=answers) if answers else None


_YES_NO = ("Yes", "No")
_NO_YES = ("No", "Yes")

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("sst2", "classification", _labelled((" terrible", " great"), lambda r: ("", r["sentence"].strip(),
                                                                                    " It was")),
             "nyu-mll/glue", "sst2", description="SST-2 sentiment (GLUE): sentence, label 0/1"),
    TaskSpec("rte", "classification", _labelled(_YES_NO, lambda r: ("", r["premise"], f"\nDoes this mean that "
                                                f"\"{r['hypothesis']}\" is true? Yes or No?\n")),
             "aps/super_glue", "rte", description="RTE entailment (SuperGLUE): premise, hypothesis, label"),
    TaskSpec("cb", "classification", _labelled(("Yes", "No", "Maybe"), lambda r: ("Suppose ", r["premise"], f" Can we "
                                               f"infer that \"{r['hypothesis']}\"? Yes, No, or Maybe?\n")),
             "aps/super_glue", "cb", description="CommitmentBank (SuperGLUE): premise, hypothesis, label 0-2"),
    TaskSpec("boolq", "classification", _labelled(_NO_YES, lambda r: ("", r["passage"],
                                                                      f" {_question(r['question'])}\n")),
             "aps/super_glue", "boolq", description="BoolQ (SuperGLUE): passage, question, label 0/1"),
    TaskSpec("wsc", "classification", _labelled(_NO_YES, lambda r: ("", r["text"], f"\nIn the previous sentence, does "
                                                f"the pronoun \"{r['span2_text'].lower()}\" refer to "
                                                f"{r['span1_text']}? Yes or No?\n")),
             "aps/super_glue", "wsc.fixed", description="Winograd schema (SuperGLUE wsc.fixed): text, spans, label"),
    TaskSpec("wic", "classification", _labelled(_NO_YES, lambda r: (f"Does the word \"{r['word']}\" have the same "
                                                "meaning in these two sentences? Yes, No?\n", r["sentence1"],
                                                f"\n{r['sentence2']}\n")),
             "aps/super_glue", "wic", description="Word in context (SuperGLUE): word, sentence1/2, label"),
    TaskSpec("multirc", "classification", _labelled(_NO_YES, lambda r: ("", r["paragraph"], f"\nQuestion: "
                                                    f"{r['question']}\nI found this answer \"{r['answer']}\". "
                                                    f"Is that correct? Yes or No?\n")),
             "aps/super_glue", "multirc", description="MultiRC (SuperGLUE): paragraph, question, answer, label"),
    TaskSpec("copa", "classification", _copa, "aps/super_glue", "copa",
             description="COPA (SuperGLUE): premise, choice1/2, question cause/effect, label"),
    TaskSpec("record", "classification", _record, "aps/super_glue", "record",
             description="ReCoRD (SuperGLUE): passage, query, entities (the candidates), answers"),
    TaskSpec("squad", "generation", _squad, "rajpurkar/squad", None,
             description="SQuAD v1.1: title, context, question, answers.text; exact match / F1"),
    TaskSpec("drop", "generation", _drop, "ucinlp/drop", None,
             description="DROP: passage, question, answers_spans.spans; exact match / F1"),
]}
"""The MeZO task suite by name."""


# --------------------------------------------------------------------------- tasks over any columns
@dataclass(frozen=True)
class ColumnTask:
    """Any labelled-text table: ``template`` with ``{text}`` from ``text_column``, one label word per
    label value of ``label_column`` (``label_words`` maps the value, as a string, to the word)."""

    label_words: Mapping[str, str]
    template: str = "Review: {text}\nSentiment:"
    text_column: str = "text"
    label_column: str = "label"
    name: str = "text-classification"
    drop_unknown_labels: bool = False
    """Drop rows whose label value is not a key of ``label_words`` (with a warning); False: such rows are
    an error naming the values, so a typo in a label word cannot silently remove a class."""
    ignored_labels: tuple[str, ...] = ()
    """Label values whose rows are not examples of the task and are left out quietly (the embedded
    data's ``plot`` summaries)."""
    kind: Kind = field(default="classification", init=False)

    def __post_init__(self) -> None:
        if self.template.count("{text}") != 1:
            raise TaskError(f"the prompt template {self.template!r} needs exactly one {{text}} placeholder")
        words = [w.strip() for w in self.label_words.values()]
        if len(words) < 2:
            raise TaskError(f"a classification task needs at least two classes; got label words {dict(self.label_words)}")
        if len(set(words)) != len(words) or not all(w.strip() for w in words):
            raise TaskError(f"label words must be distinct and non-blank: {dict(self.label_words)}")

    @property
    def metric(self) -> str:
        return "accuracy"

    @property
    def candidates(self) -> tuple[str, ...]:
        return tuple(f" {w.strip()}" for w in self.label_words.values())

    def check_rows(self, records: Sequence[Mapping[str, Any]]) -> None:
        """TaskError naming the label values of ``records`` that have no label word (unless
        ``drop_unknown_labels``: then a warning); a warning for label words that no row uses."""
        blank = [number for number, r in enumerate(records, start=1) if blank_label(r.get(self.label_column))]
        if blank and not self.drop_unknown_labels:
            shown = ", ".join(map(str, blank[:10])) + (f" and {len(blank) - 10} more" if len(blank) > 10 else "")
            raise TaskError(f"label column {self.label_column!r} is empty in {len(blank)} rows (rows {shown}, counting "
                            "data rows from 1): fill them in, or pass --drop-unknown-labels to leave them out")
        if blank:
            logger.warning("leaving out %d rows with an empty label", len(blank))
        values = collections.Counter(str(r.get(self.label_column)) for r in records
                                     if not blank_label(r.get(self.label_column)))
        unknown = {v: n for v, n in values.items() if v not in self.label_words and v not in self.ignored_labels}
        unused = [k for k in self.label_words if k not in values]
        found = ", ".join(f"{v!r} ({n} rows)" for v, n in sorted(unknown.items(), key=lambda item: -item[1]))
        given = " ".join(f"{k}={w}" for k, w in self.label_words.items())
        names = ", ".join(map(repr, unused))
        if unknown and not self.drop_unknown_labels:
            raise TaskError(f"label column {self.label_column!r} has values without a label word: {found}; the label "
                            f"words are {given}" + (f" ({names} matches no row)" if unused else "") + ". Values match "
                            "exactly (case and spaces count): add VALUE=WORD to --label-words, fix the typo, or pass "
                            "--drop-unknown-labels to leave those rows out")
        if unknown:
            logger.warning("leaving out %d rows whose label has no label word: %s", sum(unknown.values()), found)
        if unused:
            logger.warning("label words %s match no row of this data (label values are %s)", names,
                           ", ".join(map(repr, sorted(values))))

    def render(self, row: Mapping[str, Any]) -> Example | None:
        """The example of ``row``; None when its label is not one of the label words or its text is empty."""
        labels = list(self.label_words)
        value, text = str(row.get(self.label_column)), str(row.get(self.text_column) or "").strip()
        if value not in labels or not text:
            return None
        before, after = self.template.split("{text}")
        return framed(before, text, after, self.candidates, labels.index(value))


@dataclass(frozen=True)
class TextTask:
    """Causal-LM data: plain text (``prompt_column`` None: every token is supervised) or instruction data
    (the response after the prompt is supervised). Evaluated by held-out loss and perplexity."""

    text_column: str = "text"
    prompt_column: str | None = None
    template: str = "{prompt}\n"
    """How an instruction prompt is laid out before the response."""
    name: str = "lm"
    kind: Kind = field(default="lm", init=False)

    @property
    def metric(self) -> str:
        return "loss"

    def render(self, row: Mapping[str, Any]) -> Example | None:
        text = str(row.get(self.text_column) or "")
        if not text.strip():
            return None
        if self.prompt_column is None:
            return Example("", answers=(text,))
        before, after = self.template.split("{prompt}", 1)
        return framed(before, str(row.get(self.prompt_column) or ""), after, answers=(text,))


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``; TaskError listing the known names otherwise."""
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
