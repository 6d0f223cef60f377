"""The ``zo2 finetune`` job from its parsed arguments: check the model folder, load the data and the
model, train with evaluation before, during and after, save, and write the summary."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from ...adapters import describe as describe_adapter
from ...adapters import load_trained
from ...adapters import wrap as add_adapter
from ...checkpoint import Checkpoint, latest_checkpoint, load_checkpoint
from ...config import ZOConfig
from ...tasks import TaskError
from .data import load_data
from .interrupt import RunInterrupted, StopGuard, StopRequested
from .job import Run
from .lr import average_if_asked, search_if_asked
from .model import check_model_folder, load_embedded_model, load_local_model
from .report import write_outputs
from .summary import build_summary

logger = logging.getLogger(__name__)


def latest_resumable(output_dir: Path) -> Checkpoint | None:
    """The newest checkpoint under ``output_dir/checkpoints`` (loaded), or None when there is none."""
    path = latest_checkpoint(output_dir / "checkpoints")
    return load_checkpoint(path) if path is not None else None


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


def run(args: argparse.Namespace) -> dict:
    """The finetune job; returns the summary (also saved as JSON with a loss-curve PNG in --output-dir).
    Raises :class:`RunInterrupted` after Ctrl-C, once the run's state is saved."""
    started = time.perf_counter()
    if args.model is not None:
        check_model_folder(args.model)
    if args.resume and (args.output_dir is None or args.first_order):
        raise TaskError("--resume needs --output-dir (where the checkpoints are) and a zeroth-order run")
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
    if args.peft != "none":  # a checkpoint holds the adapter alone: the base model, then the saved adapter
        model = (load_trained(model, checkpoint.path) if checkpoint is not None else
                 add_adapter(model, args.peft, rank=args.lora_rank, alpha=args.lora_alpha, targets=args.peft_targets,
                               seed=args.seed))
        logger.info("training a %s adapter: %d of %d parameters", describe_adapter(model),
                    sum(p.numel() for p in model.parameters() if p.requires_grad),
                    sum(p.numel() for p in model.parameters()))
    logger.info("task %s (%s, metric %s): %d train / %d eval examples from %s", data.task.name, data.task.kind,
                data.task.metric, len(data.train), len(data.eval), data.name)
    resolved = {"offload": config.zo2, "working_device": config.working_device,
                "dtype": str(dtype).removeprefix("torch.")}
    job = Run(args, data, tokenizer, model, config, resolved)
    job.check_lengths()
    if checkpoint is not None:
        job.restore(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint.path, job.step)
    with StopGuard() as job.guard:
        try:
            job.stop_reason = _train_and_evaluate(job, fresh=checkpoint is None)
            saved = job.save_final()
            average_if_asked(job)
        except KeyboardInterrupt:  # the second Ctrl-C: the step is abandoned, nothing more is saved
            raise RunInterrupted(job.step, args.steps, None, resumable=job.engine is not None, abandoned=True,
                                 latest=job.latest) from None
    summary = build_summary(job, time.perf_counter() - started, str(checkpoint.path) if checkpoint else None)
    if job.output is not None:
        write_outputs(summary, job.output)
    if job.stop_reason == "interrupted":
        raise RunInterrupted(job.step, args.steps, saved, resumable=job.engine is not None)
    return summary
