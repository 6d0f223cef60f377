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
import os
import types
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel

from .config import ZOConfig
from .distributed import role_for
from .engine import ZOEngine
from .loading import save_offloaded
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


def _zo_init(self: nn.Module, config: ZOConfig) -> ZOEngine:
    """Move the model into zo2's flat storage under ``config`` and return its engine (under a
    launcher, this rank's data-parallel engine: see :func:`engine_for_this_process`)."""
    if getattr(self, "zo_engine", None) is not None:
        raise RuntimeError("zo_init was already called on this model")
    self.zo_engine = engine_for_this_process(self, config)
    self.zo_training = False
    self.zo_last_step: StepResult | None = None
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


def _zo_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    engine = self.zo_engine
    if not self.zo_training:
        return engine.forward(*args, **kwargs)
    if args:
        raise TypeError("in zo_train mode pass the batch as keyword arguments, e.g. model(input_ids=..., labels=...)")
    self.zo_last_step = engine.step(kwargs)
    return torch.tensor(self.zo_last_step.loss)


def attach_zo_methods(model: nn.Module) -> nn.Module:
    """Give one model instance ``zo_init``, ``zo_train`` and ``zo_eval`` (what ``zo_hf_init`` does)."""
    for name, fn in (("zo_init", _zo_init), ("zo_train", _zo_train), ("zo_eval", _zo_eval)):
        setattr(model, name, types.MethodType(fn, model))
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
