"""ZOTrainer: ``transformers.Trainer`` training with zeroth-order (MeZO) steps.

    trainer = ZOTrainer(model, args=TrainingArguments(...), zo_config=ZOConfig(eps=1e-3, ...),
                        train_dataset=..., eval_dataset=..., data_collator=..., processing_class=...)
    trainer.train()                              # or train(resume_from_checkpoint=True)

Only the smallest hooks of Trainer are overridden; its training loop, schedulers, callbacks, logging,
evaluation and checkpoint rotation run unchanged:

* ``create_optimizer`` makes a :class:`ZOOptimizer`: it carries the learning rate (so every lr
  scheduler and warmup works as usual) and the engine state (so Trainer's own optimizer.pt save and
  resume restore the step count and update history). Its ``step()`` is a no-op (see below).
* ``training_step`` runs ``engine.accumulate`` on each micro-batch (gradient accumulation: the k
  micro-batches of a step share its seed and weights); on the last micro-batch of a step it commits
  the update with the scheduler's current lr and returns the step's loss, so Trainer's loss logs,
  ``train_loss`` and callbacks see the real ZO loss. No backward pass runs.
* ``compute_loss`` (evaluation only) runs ``engine.forward``: flushed weights, eval mode, no autograd.
* saving flushes pending updates first; every checkpoint also gets ``zo2_state.json``, the seed log
  and a sha256 manifest (written last, before old checkpoints are rotated away), and
  ``train(resume_from_checkpoint=...)`` refuses a partial or corrupt checkpoint
  (:class:`zo2.checkpoint.CheckpointError`); ``True`` picks the newest complete one.
* the engine owns the weights' placement: Trainer and accelerate neither move the model nor wrap it
  in DDP. Under ``torchrun``, each process trains on its shard of every batch (accelerate's sharded
  dataloader) and the engine all-reduces the loss statistics (``zo2.distributed.role_for``), whether
  the trainer built it from ``zo_config`` or ``model.zo_init(config)`` did (both build it with
  :func:`zo2.hf.engine_for_this_process`).
"""
from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...checkpoint import (
    SEED_LOG_NAME,
    STATE_NAME,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_seed_log,
    write_manifest,
)
from ...config import ZOConfig
from ...engine import ZOEngine
from ...hf import engine_for_this_process, on_this_rank, training_objective
from ...persist.compat import mark_placed, rotate_checkpoints
from ...persist.durable import write_json
from ...result import StepResult
from ..zo2_arguments import follow_model_lr, map_tokenizer

logger = logging.getLogger(__name__)

_REFUSED = {  # TrainingArguments fields that cannot apply to ZO training, and what to do instead
    "fp16": "fp16 mixed precision needs a gradient scaler and ZO has no gradients: load the model in float16 "
            "or set ZOConfig.storage_dtype",
    "torch_compile": "the engine wraps the model's modules itself",
    "deepspeed": "the engine places (and offloads) the weights itself: use ZOConfig.zo2 / offloading_blocks",
    "fsdp": "the engine places (and offloads) the weights itself: use ZOConfig.zo2 / offloading_blocks",
    "label_smoothing_factor": "the ZO loss is the model's own loss; label smoothing is not applied",
    "weight_decay": "set ZOConfig.weight_decay instead (decoupled, applied with each update)",
    "neftune_noise_alpha": "embedding noise would make the two perturbed passes see different inputs",
}
_IGNORED = {  # fields that have no effect on ZO training: turned off (SFTConfig turns them on by default)
    "bf16": "the engine runs the model in its own dtype (load it in bfloat16 or set ZOConfig.storage_dtype)",
    "gradient_checkpointing": "it saves activations for a backward pass, and ZO training has none",
    "activation_checkpointing": "it saves activations for a backward pass, and ZO training has none",
}


class ZOOptimizer(torch.optim.Optimizer):
    """The optimizer Trainer sees: one param group whose ``lr`` the lr scheduler drives, and whose
    state dict carries the engine's state (step count, update history, config).

    ``step()`` and ``zero_grad()`` do nothing: the update is committed by ``ZOTrainer.training_step``
    on the last micro-batch of each step (the step's loss is only known then), with this group's lr.
    """

    def __init__(self, engine: ZOEngine, lr: float) -> None:
        super().__init__(list(engine.model.parameters()), {"lr": lr})
        self.engine = engine

    def step(self, closure: Any = None) -> None:
        """No-op (the ZO update was committed by the training step)."""
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: ZO training computes no gradients."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zo2"] = self.engine.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the lr groups and the engine state; the model's weights must already be the saved ones."""
        state = dict(state_dict)
        engine_state = state.pop("zo2", None)
        if engine_state is None:
            raise CheckpointError("the optimizer state holds no zo2 engine state: it was not saved by a ZO trainer")
        super().load_state_dict(state)
        self.engine.load_state_dict(engine_state, weights_updated=True)


def check_training_arguments(args: Any) -> None:
    """Raise ValueError for a TrainingArguments option that cannot apply to ZO training (``_REFUSED``);
    turn off those that have no effect on it (bf16 autocast, activation checkpointing) and
    ``max_grad_norm`` (there is no gradient to clip)."""
    default_optim = type(args).__dataclass_fields__["optim"].default
    optim = getattr(args.optim, "value", args.optim)
    if optim != getattr(default_optim, "value", default_optim):
        raise ValueError(f"TrainingArguments.optim={optim!r}: ZO trainers always step with MeZO-SGD "
                         "(ZOConfig.method); a first-order optimizer cannot apply. Leave optim unset")
    fields = type(args).__dataclass_fields__
    for name, why in _REFUSED.items():
        if getattr(args, name, None):
            raise ValueError(f"TrainingArguments.{name}={getattr(args, name)!r} is not supported by ZO trainers: "
                             f"{why}")
    for name, why in _IGNORED.items():
        value = getattr(args, name, None)
        if value:
            chosen = name in fields and fields[name].default not in (None, value)
            logger.log(logging.WARNING if chosen else logging.INFO, "TrainingArguments.%s=%r is turned off: %s",
                       name, value, why)
            setattr(args, name, False)
    if args.n_gpu > 1:
        raise ValueError(f"{args.n_gpu} GPUs are visible to one process (nn.DataParallel): launch one process per "
                         "GPU with torchrun, or make one GPU visible with CUDA_VISIBLE_DEVICES")
    if args.max_grad_norm not in (0, 1.0, None):  # 1.0 is the default: don't warn for what nobody chose
        logger.warning("TrainingArguments.max_grad_norm=%s is ignored: ZO training has no gradient to clip",
                       args.max_grad_norm)
    args.max_grad_norm = 0.0


def _check_zo_config(config: ZOConfig, args: Any) -> None:
    """Refuse the parallel modes a trainer cannot drive; say that ``ZOConfig.lr`` gives way to Trainer's."""
    _check_parallel(config)
    if config.lr == "auto":
        raise ValueError("ZOConfig(lr='auto') with ZOTrainer(zo_config=...): the trainer's lr is "
                         "TrainingArguments.learning_rate; give it a number (or model.zo_init and "
                         "zo2.tuning.search_lr before the trainer)")
    if config.lr is not None and config.lr != args.learning_rate:
        logger.warning("ZOConfig.lr=%g is ignored: the trainer's lr is TrainingArguments.learning_rate=%g "
                       "(with its schedule)", config.lr, args.learning_rate)


def _check_parallel(config: ZOConfig) -> None:
    if config.perturbation_parallel > 1 or config.direction_parallel > 1:
        raise ValueError("ZO trainers shard the data over all processes (data parallel); ZOConfig."
                         "perturbation_parallel and direction_parallel need the engine API with "
                         "zo2.distributed.shard_batch")


def _tokens(inputs: dict[str, Any]) -> int:
    mask = inputs.get("attention_mask")
    ids = inputs.get("input_ids")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    return ids.numel() if isinstance(ids, torch.Tensor) else 0


class ZOTrainerMixin:
    """The hooks that make a ``transformers.Trainer`` subclass train with a :class:`~zo2.ZOEngine`.

    ``zo_config``: the ZO settings (eps, noise, seed, offloading, storage dtype, ...); the learning rate
    and its schedule come from TrainingArguments. Or call ``model.zo_init(config)`` first and omit it (ZO2's
    flow): then the model's ``ZOConfig.lr`` is the learning rate (TrainingArguments' schedule scales it),
    and a different ``TrainingArguments.learning_rate`` is named in a warning.
    """

    zo_engine: ZOEngine

    def __init__(self, *args: Any, zo_config: ZOConfig | None = None, **kwargs: Any) -> None:
        map_tokenizer(kwargs)
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        check_training_arguments(self.args)
        for attribute, why in (("optimizer", "the ZO optimizer is built by the trainer"),
                               ("lr_scheduler", "set TrainingArguments.lr_scheduler_type"),
                               ("optimizer_cls_and_kwargs", "the ZO optimizer is built by the trainer"),
                               ("compute_loss_func", "the ZO loss is the model's own loss"),
                               ("model_init", "pass the model itself")):
            if getattr(self, attribute, None) is not None:
                raise ValueError(f"{name} does not take {attribute}: {why}")
        self.zo_engine = self._zo_engine(zo_config)
        mark_placed(self.model)  # the engine owns placement: no move, no DDP wrapper
        self._zo_results: list[StepResult] = []
        self._zo_tokens = 0
        self._zo_since: float | None = None
        self.zo2_training_step_pre_hooks: list = []
        """ZO2's step hooks: ``hook(model, inputs) -> (model, inputs)`` before each (micro-)batch."""
        self.zo2_training_step_post_hooks: list = []
        """``hook(model, inputs, loss) -> (model, inputs, loss)`` after each step's update is recorded."""

    def register_zo2_training_step_pre_hook(self, hook_fn: Any) -> None:
        """Call ``hook_fn(model, inputs) -> (model, inputs)`` before each training (micro-)batch (ZO2's API)."""
        self.zo2_training_step_pre_hooks.append(hook_fn)

    def register_zo2_training_step_post_hook(self, hook_fn: Any) -> None:
        """Call ``hook_fn(model, inputs, loss) -> (model, inputs, loss)`` after each step is committed (ZO2's
        API); the loss it returns is the step's logged loss. The update is already recorded then."""
        self.zo2_training_step_post_hooks.append(hook_fn)

    def _zo_engine(self, zo_config: ZOConfig | None) -> ZOEngine:
        """The model's own engine (``model.zo_init``), or one built from ``zo_config`` exactly as
        ``zo_init`` builds it (:func:`zo2.hf.engine_for_this_process`): data parallel under a launcher."""
        engine = getattr(self.model, "zo_engine", None)
        if engine is None:
            if zo_config is None:
                raise ValueError(f"{type(self).__name__} needs zo_config=ZOConfig(...) (or a model on which "
                                 "model.zo_init(config) was called)")
            _check_zo_config(zo_config, self.args)
            return engine_for_this_process(self.model, zo_config)
        if zo_config is not None and on_this_rank(zo_config) != engine.config:
            raise ValueError("the model already has a zo_engine (model.zo_init) with another config: "
                             "pass zo_config=None to use it")
        if self.args.world_size > 1 and engine.role.all_reduce is None:
            raise ValueError(f"{self.args.world_size} processes train, but the model's zo_engine was built for one "
                             "process: call model.zo_init(config) in every process the launcher started, or pass "
                             "zo_config=... to the trainer")
        _check_parallel(engine.config)
        follow_model_lr(self.args, engine)
        return engine

    # ------------------------------------------------------------------------ optimizer, placement
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = ZOOptimizer(self.zo_engine, self.args.learning_rate)
        return self.optimizer

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        """The engine placed the weights (working device, offloaded blocks): leave them there."""

    # --------------------------------------------------------------------------- training, eval
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """Accumulate one micro-batch; on the step's last one commit the update and return the step's
        loss (0 for the earlier micro-batches, so Trainer's sum over a step is the step's loss)."""
        if self._zo_since is None:
            self._zo_since = time.perf_counter()
        for hook in self.zo2_training_step_pre_hooks:
            model, inputs = hook(model, inputs)
        self.zo_engine.accumulate(inputs, objective=training_objective(self.model, inputs))
        self._zo_tokens += _tokens(inputs)
        if not self.accelerator.sync_gradients:  # Trainer's flag: more micro-batches of this step follow
            return torch.zeros((), device=self.args.device)
        result = self.zo_engine.commit(lr=self.optimizer.param_groups[0]["lr"])
        self._zo_results.append(result)
        loss = torch.tensor(result.loss, device=self.args.device)
        for hook in self.zo2_training_step_post_hooks:
            model, inputs, loss = hook(model, inputs, loss)
        return loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Evaluation loss: the model's own loss on the current (flushed) weights."""
        outputs = self.zo_engine.forward(**inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the ZO quantities to each training log: mean projected gradient and +/-eps losses since
        the last log, this process's tokens/s, and peak GPU memory when on CUDA."""
        if "loss" in logs and self._zo_results:
            logs.pop("grad_norm", None)  # Trainer's norm of gradients that ZO never computes
            results, self._zo_results = self._zo_results, []
            logs["projected_grad"] = sum(r.projected_grad for r in results) / len(results)
            logs["loss_minus"] = sum(r.loss_minus for r in results) / len(results)
            elapsed = time.perf_counter() - self._zo_since
            logs["tokens_per_second"] = round(self._zo_tokens / elapsed, 1) if elapsed > 0 else 0.0
            self._zo_tokens, self._zo_since = 0, None
            if self.zo_engine.device.type == "cuda":
                logs["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(self.zo_engine.device) / 2**30, 3)
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------------------- save and load
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self.zo_engine.flush()
        super()._save(output_dir, state_dict)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint plus ``zo2_state.json``, the seed log and the manifest, written last;
        older checkpoints are rotated away only after the new one is complete."""
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = Path(self._get_output_dir(trial=trial))
        directory = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.accelerator.wait_for_everyone()  # every rank's rng state is on disk before the manifest
        if not self.args.should_save:
            return
        engine = self.zo_engine
        write_json(directory / STATE_NAME, {"engine": engine.state_dict(),
                                                   "extra": {"global_step": self.state.global_step}})
        save_seed_log(engine, directory / SEED_LOG_NAME)
        write_manifest(directory, step=self.state.global_step)
        rotate_checkpoints(self, run_dir, limit)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train; a checkpoint to resume from must be complete and intact (CheckpointError
        otherwise), and ``True`` picks the newest complete checkpoint in ``args.output_dir``."""
        if resume_from_checkpoint is True:
            found = latest_checkpoint(self.args.output_dir)
            if found is None:
                raise CheckpointError(f"no complete checkpoint to resume from in {self.args.output_dir}")
            resume_from_checkpoint = str(found)
        if resume_from_checkpoint:
            load_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self.zo_engine.flush()  # pending updates belong to the weights being replaced
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """Load the best checkpoint's weights and its engine state (its step count and history)."""
        self.zo_engine.flush()
        super()._load_best_model()
        self.zo_engine.load_state_dict(load_checkpoint(self.state.best_model_checkpoint).state, weights_updated=True)


class ZOTrainer(ZOTrainerMixin, Trainer):
    """``transformers.Trainer`` with zeroth-order (MeZO) steps on a :class:`~zo2.ZOEngine`.

    Same arguments as Trainer plus ``zo_config: ZOConfig``. Options that cannot apply to ZO training
    (a first-order ``optim``, fp16/bf16 autocast, gradient checkpointing, DeepSpeed/FSDP, weight_decay
    (use ZOConfig.weight_decay), label smoothing, custom optimizers or loss functions) raise ValueError;
    ``max_grad_norm`` is set to 0.
    """

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None and hasattr(self.model, "zo_training"):
            # model.zo_init replaced forward by (*args, **kwargs): keep the columns the class's forward takes
            # (a peft model's own forward may take *args, **kwargs too: its base model's names the columns)
            inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            columns = inspect.signature(type(inner).forward).parameters
            self._signature_columns = [*columns, "label", "label_ids", *self.label_names]
        super()._set_signature_columns_if_needed()
