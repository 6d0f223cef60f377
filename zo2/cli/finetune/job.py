"""One finetune run: the trainer (ZO engine or first-order optimizer), evaluation, the training loop and
its stops (``--steps``, the time budgets, Ctrl-C), checkpoints and exact resume.

Resume is exact: the batch of step s is a pure function of (seed, s) (:func:`training_batch`),
the perturbation seeds a function of (ZOConfig.seed, s), and a checkpoint holds flushed weights and
the engine state; a resumed run therefore reproduces the losses and the weights of a straight run.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import modeling_utils

from ...checkpoint import Checkpoint, prune_checkpoints, save_checkpoint
from ...config import ZOConfig
from ...engine import ZOEngine
from ...objectives.classification import candidate_cross_entropy
from ...persist.manifest import CheckpointError
from ...tasks import Example, PromptEncoder, TaskError, training_batch
from ...tasks import evaluate as evaluate_task
from ...tasks.scoring import paired_gain
from .budget import BUDGET_BAR_FORMAT, TimeBudget
from .classes import class_names, collapsed_class, label_counts
from .data import Data
from .folders import link_folder, save_model_folder
from .interrupt import StopGuard

logger = logging.getLogger(__name__)

RESUME_KEYS = ("task", "train_file", "eval_file", "seed", "batch_size", "train_examples", "eval_examples",
               "max_length", "template", "label_words", "first_order", "truncate", "drop_unknown_labels",
               "text_column", "label_column", "prompt_column", "objective", "peft", "peft_targets", "lora_rank")
"""Arguments a resumed run must share with the checkpoint's run (else the data would differ)."""
TRAINING_FIELDS = ("method", "method_options", "lr", "eps", "weight_decay", "noise", "seed", "num_directions",
                   "lr_scheduler", "eps_scheduler", "schedule_steps", "warmup_steps", "final_lr_ratio",
                   "final_eps_ratio")
"""ZOConfig fields a resumed run must share with the checkpoint's engine, compared as resolved (defaults
filled in), else the steps after the resume would follow other math than those before."""
_LOWER_IS_BETTER = {"loss", "perplexity"}
FIRST_ORDER_LR = 1e-6
"""--first-order's lr when --lr is not given (the zeroth-order methods have their own defaults)."""
#: Beyond float32's square root, norms and attention scores overflow (see Run.check_weights).
_LARGEST_HEALTHY_WEIGHT = torch.finfo(torch.float32).max ** 0.5


def resolve_objective(choice: str, data: Data) -> str:
    """``--objective`` resolved: classification tasks train as classification (``auto``) when every example
    has the same number of candidates; everything else trains its LM loss."""
    if data.task.kind != "classification":
        if choice == "classification":
            raise TaskError(f"--objective classification needs a classification task, not a {data.task.kind} "
                                  "task")
        return "lm"
    same = len({len(e.candidates) for e in data.train}) == 1
    if choice == "classification" and not same:
        raise TaskError("--objective classification needs the same number of candidates in every training "
                              "example; use --objective lm for this task")
    if choice == "auto":
        if not same:
            logger.info("the examples have different numbers of candidates: training the label words' LM loss")
        return "classification" if same else "lm"
    return choice


def _better(metric: str, value: float, best: float | None) -> bool:
    return best is None or (value < best if metric in _LOWER_IS_BETTER else value > best)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


class Run:
    """One fine-tuning run: the trainer, evaluation, the training loop and the output folder."""

    def __init__(self, args: argparse.Namespace, data: Data, tokenizer: Any, model: Any, config: ZOConfig,
                 resolved: dict[str, Any]) -> None:
        self.args, self.data, self.tokenizer, self.config = args, data, tokenizer, config
        self.resolved = resolved
        """Effective values of flags whose default depends on the machine (offload, device, dtype)."""
        self.encoder = PromptEncoder(tokenizer, args.max_length, args.truncate)
        self.objective = resolve_objective(args.objective, data)
        """``"classification"`` (cross-entropy over the label words) or ``"lm"`` (the label word's LM loss)."""
        resolved.update(objective=self.objective, noise=config.noise, num_directions=config.num_directions,
                        eps=config.eps)
        self.output = Path(args.output_dir) if args.output_dir else None
        self.metric = data.task.metric
        self.eval_labels = label_counts(data.eval)
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.first_scores: list[float] = []
        """Per-example metric of the first evaluation: later ones are paired with it (``gain_se``)."""
        self.best: dict | None = None
        self.seconds: list[float] = []
        self.train_seconds = 0.0
        """Training time of the whole run (every invocation): what --max-seconds limits."""
        self.run_seconds = 0.0
        """Training time of this invocation: what --max-run-seconds limits."""
        self.step = 0
        self.stop_reason: str | None = None
        self.truncated: dict[str, dict] = {}
        self.guard = StopGuard()  # run() enters one around training
        self.latest: Path | None = None
        """The newest checkpoint on disk (written or resumed from)."""
        self._latest_records: tuple[int, int] | None = None  # (step, evals) that self.latest holds
        self.best_dir: Path | None = None
        self._best_dir_step = -1
        self.final_dir: Path | None = None
        self.averaged: int | None = None
        """``--average-last``: how many iterates the final evaluation averaged (None: the last iterate)."""
        self.averaged_dir: Path | None = None
        if args.first_order:
            self.model, self.engine = model.to(config.working_device), None
            optimizer = torch.optim.AdamW if args.fo_optimizer == "adamw" else torch.optim.SGD
            if args.lr == "auto":
                raise TaskError("--lr auto searches zeroth-order runs only; give --first-order an lr")
            resolved["lr"] = args.lr or FIRST_ORDER_LR
            self.optimizer = optimizer(model.parameters(), lr=resolved["lr"], weight_decay=args.weight_decay)
        else:
            self.engine, self.model = ZOEngine(model, config), model
            resolved["lr"] = self.engine.lr
            logger.debug("units:\n%s", self.engine.describe())
        # transformers < 5.x may not accept a (B, 1) logits_to_keep: then every position is projected.
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the base names it
        self.select_logits = (hasattr(modeling_utils, "slice_logits_to_keep") and "logits_to_keep" in
                              inspect.signature(inner.forward).parameters)

    # ---------------------------------------------------------------------------- lengths
    def check_lengths(self) -> None:
        """Fit every prompt into ``--max-length`` once, before training: TaskError when a template cannot
        fit (or two candidates tokenise alike); one warning per split saying how many examples were cut
        and by how much."""
        generation = self.data.task.kind == "generation"
        for split, examples, room in (("train", self.data.train, None),
                                      ("eval", self.data.eval, self.args.max_new_tokens if generation else None)):
            try:
                report = self.encoder.truncation(examples, room)
            except TaskError as err:
                extra = f" and --max-new-tokens {self.args.max_new_tokens}" if generation else ""
                raise TaskError(f"--max-length {self.args.max_length}{extra} is too short: {err}") from None
            self.truncated[split] = report
            for candidates in {e.candidates for e in examples if e.candidates}:
                self.encoder.check_candidates(Example("", candidates))
            if report["cut"]:
                logger.warning("%d of %d %s examples do not fit --max-length %d: their text was cut from the %s "
                               "(--truncate), by %.0f tokens on average (at most %d); templates and answers are whole",
                               report["cut"], report["examples"], split, self.args.max_length, self.args.truncate,
                               report["tokens_cut_mean"], report["tokens_cut_max"])

    # -------------------------------------------------------------------------- evaluation
    def _forward(self, batch: dict[str, torch.Tensor]) -> Any:
        if self.engine is not None:
            return self.engine.forward(**batch)
        self.model.eval()
        with torch.no_grad():
            return self.model(**{k: v.to(self.config.working_device) for k, v in batch.items()}, use_cache=False)

    def evaluate(self, keep_best: bool = True) -> None:
        """Evaluate on the held-out set, record it (with the per-class prediction counts), warn of a
        collapse onto one class, and keep the best weights once a step beats the start (unless not
        ``keep_best``: averaged weights are not the checkpoint's)."""
        bar = functools.partial(tqdm, desc=f"eval@{self.step}", unit="batch", leave=False)
        result = evaluate_task(self.data.task.kind, self._forward, self.encoder, self.data.eval,
                                self.args.eval_batch_size, select_logits=self.select_logits,
                                progress=lambda items: self.guard.checked(bar(items)),
                                max_new_tokens=self.args.max_new_tokens)
        record: dict[str, Any] = {"step": self.step, **result.metrics}
        names = class_names(self.data.eval)
        if result.predicted and names:
            record["predicted"] = dict(zip(names, result.predicted))
        gain = ""
        if result.per_example and not self.evals:
            self.first_scores = list(result.per_example)
        elif result.per_example and len(self.first_scores) == len(result.per_example):
            paired = paired_gain(self.first_scores, result.per_example)
            record["gain"], record["gain_se"] = paired.gain, paired.se
            gain = f"; {self.metric} gain {paired.gain:+.4f} ± {paired.se:.4f} (paired SE)"
        self.evals.append(record)
        counts = "; predicted " + ", ".join(f"{k} {v}" for k, v in record["predicted"].items()) \
            if "predicted" in record else ""
        logger.info("step %d: eval %s on %d examples%s%s", self.step,
                    ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()), result.size, gain, counts)
        collapsed = collapsed_class(record["predicted"], self.eval_labels) if "predicted" in record else None
        if collapsed is not None:
            advice = ("before training: the prompt or the label words favour it" if self.step == 0 else
                      "the loss can fall while this happens; lower --lr, or keep an earlier checkpoint")
            logger.warning("step %d: %d of %d predictions are %r, the true label of %d: the model answers one class "
                           "whatever the input (%s)", self.step, record["predicted"][collapsed], result.size, collapsed,
                           self.eval_labels[collapsed], advice)
        if keep_best and _better(self.metric, result[self.metric], self.best and self.best["value"]):
            self.best = {"step": self.step, "value": result[self.metric]}
            if self.step > 0 and self.output is not None and self.args.save_best:
                self.save_best()

    # ---------------------------------------------------------------------------- training
    def train_step(self) -> dict:
        """One training step on the batch of step ``self.step``; returns its history record."""
        examples = training_batch(self.data.train, self.args.batch_size, self.args.seed, self.step)
        classify = self.objective == "classification"
        batch = self.encoder.classification_batch(examples) if classify else self.encoder.training_batch(examples)
        objective = candidate_cross_entropy if classify else None
        if self.engine is not None:
            result = self.engine.step(batch, objective=objective)
            return {"step": self.step + 1, "loss": result.loss, "loss_minus": result.loss_minus,
                    "projected_grad": result.projected_grad}
        self.model.train()
        batch = {k: v.to(self.config.working_device) for k, v in batch.items()}
        if classify:
            inputs = {k: v for k, v in batch.items() if k not in candidate_cross_entropy.targets}
            loss = candidate_cross_entropy(self.model(**inputs, use_cache=False), batch).mean()
        else:
            loss = self.model(**batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step + 1}: the loss is {float(loss)}")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": self.step + 1, "loss": float(loss.detach())}

    def _stop(self, budget: TimeBudget, trained_before: int) -> str | None:
        """Why the run stops before its next step (``steps``, ``interrupted``, ``max_seconds``,
        ``max_run_seconds``), or None."""
        if self.step >= self.args.steps:
            return "steps"
        if self.guard.requested:
            return "interrupted"
        flag = budget.exhausted(self.train_seconds, self.run_seconds, self.seconds)
        if flag is None:
            return None
        if self.step == trained_before and flag == "--max-seconds":
            logger.warning("--max-seconds %g was already spent before this resume (%.1f s of training): no step "
                           "trained. Raise it, or use --max-run-seconds for a budget per invocation",
                           self.args.max_seconds, self.train_seconds)
        else:
            logger.info("stopped after step %d of %d: the %s budget is reached (%.1f s of training in all, %.1f s in "
                        "this invocation)", self.step, self.args.steps, flag, self.train_seconds, self.run_seconds)
        return flag.removeprefix("--").replace("-", "_")

    def train(self) -> str:
        """Train until ``--steps``, a time budget or Ctrl-C, evaluating and saving on schedule; returns why
        it stopped (see :meth:`_stop`)."""
        args, trained_before = self.args, self.step
        if self.engine is not None:
            logger.info("training with lr %g (%s)", self.engine.lr, self.engine.lr_source)
        budget = TimeBudget(args.max_seconds, args.max_run_seconds)
        with logging_redirect_tqdm(), tqdm(total=args.steps, initial=self.step, desc="zo2 finetune", unit="step",
                                           bar_format=BUDGET_BAR_FORMAT if budget.limited else None) as bar:
            while (reason := self._stop(budget, trained_before)) is None:
                start = time.perf_counter()
                record = self.train_step()
                self.seconds.append(time.perf_counter() - start)
                self.train_seconds += self.seconds[-1]
                self.run_seconds += self.seconds[-1]
                self.history.append(record)
                self.step += 1
                postfix = {k: f"{v:.4g}" for k, v in record.items() if k != "step"}
                left = budget.describe_left(self.train_seconds, self.run_seconds, self.seconds, args.steps - self.step)
                if left is not None:
                    postfix["left"] = left
                bar.set_postfix(postfix, refresh=False)
                bar.update()
                if self.step == args.steps:
                    continue  # the final evaluation and save follow
                if args.eval_every and self.step % args.eval_every == 0:
                    self.evaluate()
                if args.save_every and self.step % args.save_every == 0 and self.output is not None:
                    self.save_checkpoint()
        return reason

    # ------------------------------------------------------------------------------ saving
    def check_weights(self) -> None:
        """FloatingPointError unless every trained weight is finite and small enough to square in float32:
        beyond ``sqrt(finfo(float32).max)`` norms and attention scores overflow and the forward returns zeros,
        inf or nan (what ``--lr 1e30`` does). The bound is float32's for every storage dtype, so a large but
        healthy float16 weight (above 16-bit's own root of 256) is not taken for divergence; a float16 weight
        that overflowed is inf and fails the finiteness half. Called before anything is saved, so best/, final/ and checkpoints
        never hold such weights; the last good checkpoint stays on disk. Weights a disk store holds (on
        the meta device here) are not looked at."""
        if self.engine is not None:
            self.engine.flush()  # pending updates are part of the weights
        for name, weight in self.model.named_parameters():
            if not weight.requires_grad or weight.device.type == "meta" or not weight.is_floating_point():
                continue
            largest = float(weight.detach().abs().max())
            if not largest <= _LARGEST_HEALTHY_WEIGHT:
                kept = f"the last good checkpoint is {self.latest}" if self.latest else "no checkpoint was saved"
                lr = self.resolved["lr"]
                raise FloatingPointError(f"after step {self.step} weight {name} reaches {largest:.3g}: training has "
                                         f"diverged, nothing of this step is saved ({kept}); lower --lr (now {lr})")

    @contextlib.contextmanager
    def writing(self, target: Path) -> Iterator[None]:
        """Turn an OSError while writing ``target`` (a full disk, a quota, a file size limit) into one
        CheckpointError line: what failed and what is still on disk. Writes are atomic, so nothing
        half-written is left in place."""
        try:
            yield
        except (OSError, SafetensorError) as err:  # safetensors reports a failed write as its own error
            cause = f"{err.strerror} ({err.filename})" if isinstance(err, OSError) and err.strerror else str(err)
            kept = (f"the newest checkpoint, {self.latest}, is whole: free space and rerun with --resume"
                    if self.latest and self.engine is not None else "free space and rerun")
            raise CheckpointError(f"could not write {target}: {cause}; nothing half-written was left; {kept}") from None

    def _extra(self) -> dict:
        return {"step": self.step, "history": self.history, "evals": self.evals, "best": self.best,
                "first_scores": self.first_scores,
                "train_seconds": self.train_seconds, "step_seconds": self.seconds,
                "run": {key: _jsonable(getattr(self.args, key)) for key in RESUME_KEYS}}

    def save_checkpoint(self) -> Path:
        """Save ``checkpoints/step-N`` (ZO: HF model + tokenizer + zo2 state and the run's records, for
        --resume; first-order: a plain HF folder) and prune all but the newest ``--save-total-limit``.
        A step whose weights and records are on disk already is not written again."""
        if self.latest is not None and self._latest_records == (self.step, len(self.evals)):
            return self.latest
        self.check_weights()
        folder = self.output / "checkpoints"
        path = folder / f"step-{self.step:06d}"
        with self.writing(path):
            if self.engine is not None:
                save_checkpoint(self.engine, path, tokenizer=self.tokenizer, extra=self._extra())
            else:
                save_model_folder(self.model, self.tokenizer, path)
        self.latest, self._latest_records = path, (self.step, len(self.evals))
        if self.engine is not None:  # a damaged checkpoint never counts, so no intact one goes for it
            prune_checkpoints(folder, self.args.save_total_limit)
        else:  # plain model folders (no manifest): only older ones, the newest --save-total-limit kept
            older = sorted(p for p in folder.glob("step-*") if p.is_dir() and p.name < path.name)
            for old in older[:max(0, len(older) - self.args.save_total_limit + 1)]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def save_best(self) -> None:
        """``best/``: hard links to this step's checkpoint (ZO) or a plain HF folder (first-order)."""
        target = self.output / "best"
        self.check_weights()
        source = self.save_checkpoint() if self.engine is not None else None
        with self.writing(target):
            if source is not None:
                link_folder(source, target)
            else:
                save_model_folder(self.model, self.tokenizer, target)
        self.best_dir, self._best_dir_step = target, self.step

    def save_final(self) -> Path | None:
        """The weights the run ends with: the latest checkpoint (ZO), or ``final/`` (first-order: hard links
        to ``best/`` or a checkpoint of the same step when there is one). None: nothing to save."""
        if self.output is None or self.step == 0:
            return None
        if self.engine is not None:
            return self.save_checkpoint()
        self.check_weights()
        target = self.output / "final"
        same = self.best_dir if self._best_dir_step == self.step else (
            self.latest if self._latest_records and self._latest_records[0] == self.step else None)
        with self.writing(target):
            if same is not None:
                link_folder(same, target)
            else:
                save_model_folder(self.model, self.tokenizer, target)
        self.final_dir = target
        return target

    def outputs(self) -> dict[str, str | None] | None:
        """The folders this run's weights are in, relative to ``--output-dir`` (None without one)."""
        if self.output is None:
            return None
        relative = {"checkpoint": self.latest, "best": self.best_dir, "final": self.final_dir,
                    **({"averaged": self.averaged_dir} if self.averaged_dir else {})}
        return {k: str(p.relative_to(self.output)) if p is not None else None for k, p in relative.items()}

    def _changed_settings(self, checkpoint: Checkpoint) -> dict[str, tuple[Any, Any]]:
        """{setting: (the checkpoint's value, this run's)} of the data arguments and training fields
        that differ."""
        saved = checkpoint.extra.get("run", {})
        changed = {k: (saved.get(k), _jsonable(getattr(self.args, k))) for k in RESUME_KEYS
                   if k in saved and saved.get(k) != _jsonable(getattr(self.args, k))}
        saved_config, config = checkpoint.state.get("config", {}), self.engine.config.to_dict()
        changed.update({k: (saved_config[k], config[k]) for k in TRAINING_FIELDS
                        if k in saved_config and k not in changed and saved_config[k] != config[k]})
        return changed

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a loaded checkpoint (the model already holds its weights). TaskError listing
        every data argument and training setting that differs from the checkpoint's run."""
        extra = checkpoint.extra
        changed = self._changed_settings(checkpoint)
        if changed:
            raise TaskError(f"--resume: {checkpoint.path} was trained with other settings "
                                  + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in changed.items())
                                  + "; use the same values or another --output-dir")
        self.engine.load_state_dict(checkpoint.state, weights_updated=True)
        self.step, self.history, self.evals = int(extra["step"]), list(extra["history"]), list(extra["evals"])
        self.best, self.train_seconds = extra.get("best"), float(extra["train_seconds"])
        self.seconds = list(extra.get("step_seconds", []))
        self.first_scores = list(extra.get("first_scores", []))
        self.latest, self._latest_records = checkpoint.path, (self.step, len(self.evals))
        if self.best and self.best["step"] > 0 and (self.output / "best").is_dir():
            self.best_dir, self._best_dir_step = self.output / "best", self.best["step"]
