"""The ``zo2 finetune`` job: data and model, evaluation, MeZO (or a first-order baseline) training with
periodic evaluation, checkpoints, best-weights keeping, time budgets, Ctrl-C handling and exact
resume, then a summary and a loss-curve PNG. :mod:`.arguments` defines the flags; :func:`run` takes them
as an ``argparse.Namespace``.

* :mod:`.command`: :func:`run`, from the flags to the summary.
* :mod:`.model`: the model folder check and loading (the embedded SmolLM2 is converted once, cached).
* :mod:`.data`: the task and its train/eval examples.
* :mod:`.job`: :class:`Run`, the training loop, evaluation and saving.
* :mod:`.budget`, :mod:`.interrupt`: ``--max-seconds``/``--max-run-seconds``; Ctrl-C, SIGTERM and SIGHUP.
* :mod:`.output_folder`: ``--output-dir`` claimed (checked, marked, locked) before anything is loaded.
* :mod:`.folders`: output folders written atomically, with hard links instead of second copies.
* :mod:`.summary`: ``summary.json``; :mod:`.classes`: label words, true-label counts, collapsed predictions;
  :mod:`.report`: the printed summary and the loss-curve PNG.

Output folder layout::

    .zo2-run.json, .zo2-run.lock   the marker naming the run, the lock a live run holds
    summary.json, loss_curve.png
    checkpoints/step-000040/   the latest checkpoints (HF model + tokenizer + zo2 state); --resume uses them
    best/                      the best eval metric, once a step beats the start (hard links to a checkpoint)
    final/                     first-order runs: the last weights (hard links to best/ when the same step)
"""
from .command import latest_resumable, run
from .data import EMBEDDED_DATA, GENERIC_TASKS, Data, load_data
from .interrupt import RunInterrupted
from .job import RESUME_KEYS, Run
from .model import (
           EMBEDDED_GGUF,
           EMBEDDED_MODEL,
           cache_dir,
           check_model_folder,
           load_embedded_model,
           load_local_model,
           save_atomically,
)
from .summary import build_summary

__all__ = ["run", "latest_resumable", "EMBEDDED_DATA", "GENERIC_TASKS", "Data", "load_data", "RunInterrupted",
           "RESUME_KEYS", "Run", "EMBEDDED_GGUF", "EMBEDDED_MODEL", "cache_dir", "check_model_folder",
           "load_embedded_model", "load_local_model", "save_atomically", "build_summary"]
