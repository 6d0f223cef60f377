"""The ``zo2 finetune`` job from its parsed arguments: check the model folder, load the data and the
model, train with evaluation before, during and after, save, and write the summary."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ...adapters import describe as describe_adapter
from ...adapters import load_trained
from ...adapters import wrap as add_adapter
from ...checkpoint import Checkpoint, find_intact_checkpoint
from ...config import ZOConfig
from ...persist.manifest import CheckpointError
from ...tasks import TaskError
from .data import load_data
from .interrupt import RunInterrupted, StopGuard, StopRequested
from .job import Run
from .lr import average_if_asked, search_if_asked
from .model import check_model_folder, load_embedded_model, load_local_model
from .output_folder import OutputFolder, needed_bytes
from .report import write_outputs
from .summary import build_summary

logger = logging.getLogger(__name__)


def latest_resumable(output_dir: Path) -> Checkpoint | None:
    """The newest intact checkpoint under ``output_dir/checkpoints`` (loaded and verified), or None when
    there is none. Damaged state is never a fresh start: damaged checkpoints (a manifest or state that
    does not parse, a file missing or differing from its checksum) are skipped with a warning naming each
    (:func:`zo2.checkpoint.find_intact_checkpoint`) and the newest intact one is used; when every checkpoint
    is damaged, CheckpointError names them and the ways forward."""
    folder = output_dir / "checkpoints"
    search = find_intact_checkpoint(folder)
    if search.checkpoint is None and search.damaged:
        raise CheckpointError(f"--resume: no intact checkpoint in {folder}: "
                              f"{'; '.join(reason for _, reason in search.damaged)}. Restore the files from a "
                              "copy, or pass --overwrite to start afresh")
    return search.checkpoint


def _train_and_evaluate(job: Run, fresh: bool) -> str:
    """Search the lr (``--lr auto``, once), evaluate (a fresh run), train, evaluate the end; returns the stop
    reason. Ctrl-C during the search or an evaluation abandons it (``interrupted``)."""
    try:
        search_if_asked(job)  # first: a search that cannot work fails early; it leaves the start weights exactly
        if fresh:
            job.evaluate()
        reason = job.train() if job.step < job.args.steps else "steps"
        if reason != "interrupted" and job.evals[-1]["step"] != job.step:
            job.evaluate()
        return reason
    except StopRequested:
        return "interrupted"


def _adapted(model: Any, args: argparse.Namespace, checkpoint: Checkpoint | None) -> Any:
    """``model`` with its adapter (``--peft``): the checkpoint's, or a fresh one. peft's complaints about
    the target modules become one line naming the fix."""
    if checkpoint is not None:  # a checkpoint holds the adapter alone: the base model, then the saved adapter
        return load_trained(model, checkpoint.path)
    try:
        return add_adapter(model, args.peft, rank=args.lora_rank, alpha=args.lora_alpha, targets=args.peft_targets,
                           seed=args.seed)
    except ValueError as err:
        if "target" not in str(err).lower():  # peft's complaints name target_modules; anything else is not ours
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        cause = (f"--peft-targets {' '.join(args.peft_targets)} names no module of this model" if args.peft_targets
                 else f"peft has no default target modules for model type {model.config.model_type!r}")
        raise TaskError(f"--peft {args.peft}: {cause}; pass --peft-targets with some of its linear layers: "
                        f"{' '.join(linear)}") from None


def _weight_bytes(model: Any) -> int:
    """Bytes of what a checkpoint stores: the trainable tensors of an adapter run, else every tensor
    (tied weights once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    if getattr(model, "peft_config", None):
        tensors = {p.data_ptr(): p for p in model.parameters() if p.requires_grad}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _check_positions(model: Any, max_length: int) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise TaskError(f"--max-length {max_length} is beyond the model's {positions} positions "
                        f"(max_position_embeddings): pass --max-length {positions} or less")


def run(args: argparse.Namespace) -> dict:
    """The finetune job; returns the summary (also saved as JSON with a loss-curve PNG in --output-dir).
    Raises :class:`RunInterrupted` after Ctrl-C, SIGTERM or SIGHUP, once the run's state is saved."""
    started = time.perf_counter()
    if args.model is not None:
        check_model_folder(args.model)
    if args.resume and (args.output_dir is None or args.first_order):
        raise TaskError("--resume needs --output-dir (where the checkpoints are) and a zeroth-order run")
    if args.resume and args.overwrite:
        raise TaskError("--resume continues the run in --output-dir, --overwrite deletes it: pass one of them")
    folder = (OutputFolder.claim(args.output_dir, resume=args.resume, overwrite=args.overwrite)
              if args.output_dir else None)
    try:
        with StopGuard() as guard:
            return _run(args, folder, guard, started)
    finally:
        if folder is not None:
            folder.release()


def _run(args: argparse.Namespace, folder: OutputFolder | None, guard: StopGuard, started: float) -> dict:
    data = load_data(args)
    offload = args.offload if args.offload is not None else args.working_device.startswith("cuda")
    schedules = {"lr_scheduler": args.lr_scheduler, "eps_scheduler": args.eps_scheduler,
                 "warmup_steps": args.warmup_steps}
    config = ZOConfig(method=args.method, method_options=dict(args.method_options or ()), lr=args.lr, eps=args.eps,
                      seed=args.seed, noise=args.noise, weight_decay=args.weight_decay, average_last=args.average_last,
                      num_directions=args.num_directions, max_parts_per_walk=args.max_parts_per_walk,
                      zo2=offload and not args.first_order, offloading_blocks=args.offloading_blocks,
                      working_device=args.working_device, storage_dtype=args.storage_dtype, **schedules,
                      schedule_steps=args.steps if {args.lr_scheduler, args.eps_scheduler} != {"constant"} else None)
    dtype = getattr(torch, args.dtype) if args.dtype else (config.torch_storage_dtype or torch.float32)
    checkpoint = latest_resumable(Path(args.output_dir)) if args.resume else None
    if args.resume and checkpoint is None:
        logger.info("--resume: no checkpoint in %s/checkpoints; starting from the beginning", args.output_dir)
    source = checkpoint.path if checkpoint is not None and args.peft == "none" else args.model
    tokenizer, model = load_local_model(source, dtype) if source else load_embedded_model(dtype)
    _check_positions(model, args.max_length)
    if args.peft != "none":
        model = _adapted(model, args, checkpoint)
        logger.info("training a %s adapter: %d of %d parameters", describe_adapter(model),
                    sum(p.numel() for p in model.parameters() if p.requires_grad),
                    sum(p.numel() for p in model.parameters()))
    if folder is not None:
        folder.check_room(needed_bytes(_weight_bytes(model), args.save_total_limit, args.first_order))
    logger.info("task %s (%s, metric %s): %d train / %d eval examples from %s", data.task.name, data.task.kind,
                data.task.metric, len(data.train), len(data.eval), data.name)
    resolved = {"offload": config.zo2, "working_device": config.working_device,
                "dtype": str(dtype).removeprefix("torch.")}
    job = Run(args, data, tokenizer, model, config, resolved)
    job.guard = guard
    job.check_lengths()
    if checkpoint is not None:
        job.restore(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint.path, job.step)
    try:
        job.stop_reason = _train_and_evaluate(job, fresh=checkpoint is None)
        saved = job.save_final()
        average_if_asked(job)
        summary = build_summary(job, time.perf_counter() - started, str(checkpoint.path) if checkpoint else None)
        if job.output is not None:
            with job.writing(job.output / "summary.json"):
                write_outputs(summary, job.output)
    except KeyboardInterrupt:  # the second signal: the step is abandoned, nothing more is saved
        raise RunInterrupted(job.step, args.steps, None, resumable=job.engine is not None, abandoned=True,
                             latest=job.latest, cause=guard.cause) from None
    if job.stop_reason == "interrupted":
        raise RunInterrupted(job.step, args.steps, saved, resumable=job.engine is not None, cause=guard.cause)
    return summary
