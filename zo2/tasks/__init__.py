"""Tasks for fine-tuning a causal LM: data loading, the MeZO task suite's prompt templates, batches with
supervised continuations, and evaluation (candidate scoring, greedy answers, held-out loss).

* :mod:`.data`: local files (CSV/TSV/JSON/JSONL/parquet), Hugging Face datasets by name, splits and the
  training batch order (a pure function of seed and step, so resumed runs see the same batches).
* :mod:`.registry`: :class:`Example`, the task registry :data:`TASKS` (SST-2, RTE, CB, BoolQ, WSC, WiC,
  MultiRC, COPA, ReCoRD, SQuAD, DROP) and tasks over any columns (:class:`ColumnTask`, :class:`TextTask`).
* :mod:`.encoding`: :class:`PromptEncoder` (right-padded batches, only the continuation supervised).
* :mod:`.scoring`: :func:`evaluate` and the metrics.
"""
from .data import (
                   FORMATS,
                   TaskError,
                   batch_indices,
                   check_columns,
                   distinct_labels,
                   load_hub_split,
                   package_data_file,
                   read_records,
                   rotten_tomatoes_path,
                   split_examples,
                   subsample,
                   training_batch,
)
from .encoding import IGNORE_INDEX, TRUNCATION_SIDES, PromptEncoder, make_examples
from .registry import TASKS, ColumnTask, Example, TaskSpec, TextTask, framed, get_task
from .scoring import (
                      EvalResult,
                      PairedGain,
                      answer_f1,
                      candidate_scores,
                      evaluate,
                      greedy_answers,
                      normalize_answer,
                      paired_gain,
                      token_logprobs,
)

ROTTEN_TOMATOES = ColumnTask(label_words={"rotten": "negative", "fresh": "positive"}, label_column="category",
                             name="rotten_tomatoes", ignored_labels=("plot",))
"""The embedded default task: Rotten Tomatoes critic snippets, rotten -> " negative", fresh -> " positive"
(the corpus's ``plot`` summaries are not reviews: left out)."""

__all__ = ["FORMATS", "TaskError", "batch_indices", "check_columns", "distinct_labels", "load_hub_split",
           "package_data_file", "read_records", "rotten_tomatoes_path", "split_examples", "subsample",
           "training_batch", "IGNORE_INDEX", "TRUNCATION_SIDES", "PromptEncoder", "make_examples", "TASKS",
           "ColumnTask", "Example", "TaskSpec", "TextTask", "framed", "get_task", "EvalResult", "answer_f1",
           "candidate_scores", "evaluate", "PairedGain", "paired_gain", "greedy_answers", "normalize_answer", "token_logprobs", "ROTTEN_TOMATOES"]
