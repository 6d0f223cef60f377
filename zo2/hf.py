"""ZO2-compatible Hugging Face API: ``zo_hf_init`` and the ``zo_*`` methods of a model.

    with zo_hf_init(cfg):
        model = OPTForCausalLM.from_pretrained(path)
        model.zo_init(cfg)
    model.zo_train(); loss = model(input_ids=ids, labels=ids)    # one full ZO step
    model.zo_eval();  out = model(input_ids=ids)                  # normal output, flushed weights

Inside ``zo_hf_init`` every transformers model that is built (``from_pretrained``, ``from_config``,
``AutoModel...``, or a plain constructor) gets the ``zo_*`` methods; on exit transformers is
restored exactly as it was, and the models keep their methods.

Under a distributed launcher (``torchrun``, ``accelerate launch``) ``zo_init`` builds this rank's
data-parallel engine (:func:`engine_for_this_process`), so the same script trains on N processes:
each steps on its own batches (``ZOTrainer`` shards them) and the engine all-reduces the losses.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import types
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel

from .config import ZOConfig
from .distributed import role_for
from .engine import ZOEngine
from .loading import save_offloaded
from .objectives import loss_hooks
from .objectives.base import Objective
from .result import StepResult


def on_this_rank(config: ZOConfig) -> ZOConfig:
    """``config`` with a bare ``working_device="cuda"`` made this process's GPU once a process group
    exists: ``cuda:LOCAL_RANK`` (one GPU per process, as torchrun and accelerate assign them; the
    current device where no launcher set LOCAL_RANK). Unchanged in a single process, or when the
    config names a device index itself."""
    if config.working_device != "cuda" or not dist.is_initialized():
        return config
    local_rank = os.environ.get("LOCAL_RANK")
    index = int(local_rank) if local_rank is not None else torch.cuda.current_device()
    return dataclasses.replace(config, working_device=f"cuda:{index}")


def engine_for_this_process(model: nn.Module, config: ZOConfig) -> ZOEngine:
    """The engine of ``model`` in this process: a single-process engine, or under a launcher (torchrun,
    accelerate launch) this rank's engine, which joins the process group (or uses the one accelerate or
    Trainer made), runs on this rank's GPU (:func:`on_this_rank`) and all-reduces every step's losses
    with the other ranks (:func:`zo2.distributed.role_for`). Collective under a launcher: every rank
    calls it, with the same config."""
    role = role_for(config)
    return ZOEngine(model, on_this_rank(config), role=role)


def _zo_init(self: nn.Module, config: ZOConfig, zo_training: bool = True) -> ZOEngine:
    """Move the model into zo2's flat storage under ``config`` and return its engine (under a
    launcher, this rank's data-parallel engine: see :func:`engine_for_this_process`). As in ZO2, the
    model is then in training mode (a call is a ZO step) unless ``zo_training=False``."""
    if getattr(self, "zo_engine", None) is not None:
        raise RuntimeError("zo_init was already called on this model")
    self.zo_engine = engine_for_this_process(self, config)
    self.zo_training = zo_training
    self.zo_last_step: StepResult | None = None
    self.opt = ZO2OptimizerView(self.zo_engine)
    self.forward = types.MethodType(_zo_forward, self)
    original_save = self.save_pretrained

    @functools.wraps(original_save)
    def save_pretrained(*args: Any, **kwargs: Any) -> Any:
        if self.zo_engine.store is not None:  # disk-offloaded weights live in files: stream them out
            return save_offloaded(self.zo_engine, *args, **kwargs)
        self.zo_engine.flush()
        return original_save(*args, **kwargs)

    self.save_pretrained = save_pretrained
    return self.zo_engine


def _engine(model: nn.Module) -> ZOEngine:
    engine = getattr(model, "zo_engine", None)
    if engine is None:
        raise RuntimeError("call model.zo_init(ZOConfig(...)) before zo_train/zo_eval")
    return engine


def _zo_train(self: nn.Module) -> nn.Module:
    """Calling the model now performs one ZO step and returns the loss of the +eps pass."""
    _engine(self)
    self.zo_training = True
    return self


def _zo_eval(self: nn.Module) -> nn.Module:
    """Apply pending updates; calling the model now returns its normal output."""
    _engine(self).flush()
    self.zo_training = False
    return self


def _keywords(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, as the model class's forward names them (``model(ids, labels=ids)``)."""
    if not args:
        return kwargs
    bound = inspect.signature(type(model).forward).bind_partial(model, *args, **kwargs)
    named = {k: v for k, v in bound.arguments.items() if k != "self"}
    for name, param in inspect.signature(type(model).forward).parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL and named.pop(name, ()):
            raise TypeError(f"{type(model).__name__}.forward takes no named positional arguments: pass the batch "
                            "as keyword arguments, e.g. model(input_ids=..., labels=...)")
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


def _extra_keys(model: nn.Module, batch: Mapping[str, Any]) -> tuple[str, ...]:
    """Batch keys the model's forward does not name: a ZO2 custom loss receives them as ``**kwargs``."""
    known = inspect.signature(type(model).forward).parameters
    return tuple(k for k in batch if k not in known and k != "labels")


def _custom_loss_keys(model: nn.Module, batch: Mapping[str, Any], kind: str) -> tuple[str, ...]:
    return _extra_keys(model, batch) if getattr(model, f"zo_custom_{kind}_loss_fn", None) is not None else ()


def training_objective(model: nn.Module, batch: Mapping[str, Any]) -> Objective | None:
    """What a ZO2 model's training step on ``batch`` minimises: its loss hooks and custom train loss
    (:mod:`zo2.objectives.loss_hooks`), or ``None`` (the engine's objective) when it has none."""
    if not loss_hooks.uses_loss_hooks(model, "train"):
        return None
    return loss_hooks.train_objective(model, _custom_loss_keys(model, batch, "train"))


def _zo_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    engine = self.zo_engine
    batch = _keywords(self, args, kwargs)
    if self.zo_training:
        self.zo_last_step = engine.step(batch, objective=training_objective(self, batch))
        return torch.tensor(self.zo_last_step.loss)
    if not loss_hooks.uses_loss_hooks(self, "eval"):
        return engine.forward(**batch)
    return loss_hooks.evaluate(self, engine.forward, batch, _custom_loss_keys(self, batch, "eval"))


class ZO2OptimizerView:
    """``model.opt``: ZO2's optimizer attributes, read from the engine's owners (its update log and
    config), never copied. ``projected_grad``, ``zo_random_seed`` and the applied ``lr`` are those of the
    last step (before the first: 0.0, None and the configured lr)."""

    def __init__(self, engine: ZOEngine) -> None:
        self.engine = engine

    def _last(self) -> tuple:
        log = self.engine.log
        return log.step_updates(log.steps - 1) if log.steps else ()

    @property
    def projected_grad(self) -> float:
        """The last step's projected gradient (mean over its directions)."""
        updates = self._last()
        return sum(u.projected_grad for u in updates) / len(updates) if updates else 0.0

    @projected_grad.setter
    def projected_grad(self, value: float) -> None:
        raise AttributeError("model.opt.projected_grad is read from zo2's update log, where the step's update is "
                             "already recorded: it cannot be changed to drop a step (a non-finite loss stops "
                             "training with FloatingPointError before anything is recorded)")

    @property
    def zo_random_seed(self) -> int | None:
        """The seed of z of the last step (its first direction)."""
        updates = self._last()
        return updates[0].seed if updates else None

    @property
    def lr(self) -> float:
        """The lr the last step applied (summed over its directions), else the engine's resolved lr. Setting
        it sets the lr of the next steps (``ZOEngine.lr``)."""
        updates = self._last()
        return sum(u.lr for u in updates) if updates else self.engine.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.engine.lr = value

    @property
    def zo_eps(self) -> float:
        """The perturbation scale (``ZOConfig.eps``)."""
        return self.engine.config.eps

    @property
    def weight_decay(self) -> float:
        """``ZOConfig.weight_decay``."""
        return self.engine.config.weight_decay

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """One torch-style group, read-only: the trainable parameters, ``lr``, ``weight_decay`` and ``eps``."""
        params = [p for p in self.engine.model.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.lr, "weight_decay": self.weight_decay, "eps": self.zo_eps}]


def _register(attribute: str) -> Any:
    def register(self: nn.Module, hook_fn: Any) -> None:
        getattr(self, attribute).append(hook_fn)
    register.__doc__ = f"Append ``hook_fn`` to ``model.{attribute}`` (ZO2's hook API, called in order)."
    return register


def _register_custom_opt(self: nn.Module, custom_opt_obj: Any) -> None:
    """ZO2 replaces its optimizer object here; zo2's optimizer is a method of the engine."""
    raise NotImplementedError(
        "register_custom_opt is not supported: zo2's update rule is a method plug-in, not an object on the model. "
        "Use ZOConfig(method=...) with one of zo2.METHODS, or register a new method in zo2.methods")


def attach_zo_methods(model: nn.Module) -> nn.Module:
    """Give one model instance ``zo_init``, ``zo_train`` and ``zo_eval`` (what ``zo_hf_init`` does), and
    ZO2's hook API: ``register_zo_{train,eval}_loss_fn_{pre,post}_hook``, ``zo_custom_{train,eval}_loss_fn``
    (see :mod:`zo2.objectives.loss_hooks`) and ``register_custom_opt`` (refused, naming what to use)."""
    methods = {"zo_init": _zo_init, "zo_train": _zo_train, "zo_eval": _zo_eval,
               "register_custom_opt": _register_custom_opt}
    methods.update({f"register_{name[:-1]}": _register(name) for name in loss_hooks.HOOK_LISTS})
    for name, fn in methods.items():
        setattr(model, name, types.MethodType(fn, model))
    loss_hooks.init_loss_hooks(model)
    return model


@contextlib.contextmanager
def zo_hf_init(config: ZOConfig | None = None) -> Iterator[None]:
    """Context in which every transformers model built gets the ``zo_*`` methods.

    ``config`` is accepted for ZO2 compatibility and validated; the model is placed by ``zo_init``.
    Transformers is restored on exit, even when the block raises.
    """
    if config is not None:
        config.validate()
    original = PreTrainedModel.post_init

    @functools.wraps(original)
    def post_init(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        attach_zo_methods(self)
        return result

    PreTrainedModel.post_init = post_init
    try:
        yield
    finally:
        PreTrainedModel.post_init = original
