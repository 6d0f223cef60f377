"""ZO2's loss-function hooks and custom loss functions, as zo2 objectives.

A ZO2 model carries, as attributes (the model is their one owner; ZO2 scripts append to the lists):

* ``zo_train_loss_fn_pre_hooks`` / ``zo_eval_loss_fn_pre_hooks``: ``hook(model, input_ids, logits, labels)
  -> (input_ids, logits, labels)``, called in registration order once the logits exist;
* ``zo_custom_train_loss_fn`` / ``zo_custom_eval_loss_fn``: ``fn(model, input_ids, logits, labels, **kwargs)
  -> loss``, called in place of the model's own loss, ``kwargs`` being the batch's entries the model's
  forward does not take (e.g. MeZO's ``option_len``);
* ``zo_train_loss_fn_post_hooks``: ``hook(model, loss, input_ids, logits, labels) -> (loss, input_ids,
  logits, labels)``; ``zo_eval_loss_fn_post_hooks``: ``hook(model, output, input_ids, logits, labels) ->
  (output, input_ids, logits, labels)``.

In training every perturbed pass (each part of a step) runs the chain on its own logits, so a ZO step
minimises exactly the loss the hooks produce.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .base import Objective
from .task_loss import loss_terms

KINDS = ("train", "eval")
HOOK_LISTS = tuple(f"zo_{kind}_loss_fn_{when}_hooks" for kind in KINDS for when in ("pre", "post"))
CUSTOM_FNS = tuple(f"zo_custom_{kind}_loss_fn" for kind in KINDS)


def init_loss_hooks(model: nn.Module) -> None:
    """Give ``model`` ZO2's (empty) hook lists and custom loss slots, keeping any already there."""
    for name in HOOK_LISTS:
        if not isinstance(getattr(model, name, None), list):
            setattr(model, name, [])
    for name in CUSTOM_FNS:
        if not hasattr(model, name):
            setattr(model, name, None)


def uses_loss_hooks(model: nn.Module, kind: str) -> bool:
    """Whether ``model`` has a hook or a custom loss for ``kind`` (``"train"`` or ``"eval"``)."""
    return bool(getattr(model, f"zo_{kind}_loss_fn_pre_hooks", None)
                or getattr(model, f"zo_{kind}_loss_fn_post_hooks", None)
                or getattr(model, f"zo_custom_{kind}_loss_fn", None))


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]


def model_loss(model: nn.Module, outputs: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own mean loss of ``logits`` against ``labels`` (as its task head computes it)."""
    parts = dict(outputs) if isinstance(outputs, Mapping) else {}
    total, count = loss_terms(model, {**parts, "logits": logits}, {"labels": labels})
    return total / count


def _loss(model: nn.Module, kind: str, outputs: Any, batch: Mapping[str, Any],
          extra: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Pre hooks, then the custom (or the model's) loss: (loss, input_ids, logits, labels)."""
    input_ids, labels, logits = batch.get("input_ids"), batch.get("labels"), _logits(outputs)
    for hook in getattr(model, f"zo_{kind}_loss_fn_pre_hooks"):
        input_ids, logits, labels = hook(model, input_ids, logits, labels)
    custom = getattr(model, f"zo_custom_{kind}_loss_fn")
    if labels is None:
        loss = None
    elif custom is not None:
        loss = custom(model, input_ids, logits, labels, **{k: batch[k] for k in extra if k in batch})
    else:
        loss = model_loss(model, outputs, logits, labels)
    return loss, input_ids, logits, labels


def train_objective(model: nn.Module, extra: Sequence[str] = ()) -> Objective:
    """The objective of a ZO2 model's training step: pre hooks, custom (or the model's) loss, post hooks,
    run on each part's logits. ``extra``: batch keys passed to the custom loss, not to the model."""
    def fn(outputs: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
        loss, input_ids, logits, labels = _loss(model, "train", outputs, batch, extra)
        for hook in model.zo_train_loss_fn_post_hooks:
            loss, input_ids, logits, labels = hook(model, loss, input_ids, logits, labels)
        if loss is None:
            raise ValueError("a ZO training step needs labels (or a post hook that returns a loss)")
        return loss, 1  # ZO2's losses are means: one term per part
    return Objective(fn, ("labels", *extra), "zo2-loss-hooks")


def evaluate(model: nn.Module, forward: Callable[..., Any], batch: Mapping[str, Any],
             extra: Sequence[str] = ()) -> Any:
    """A ZO2 model's evaluation output: ``forward`` on the model inputs, then the eval hooks and custom
    loss (the output's ``loss`` is replaced by theirs), then the eval post hooks on the output."""
    inputs = {k: v for k, v in batch.items() if k != "labels" and k not in extra}
    output = forward(**inputs)
    loss, input_ids, logits, labels = _loss(model, "eval", output, batch, extra)
    if loss is not None:
        output["loss"] = loss
    for hook in model.zo_eval_loss_fn_post_hooks:
        output, input_ids, logits, labels = hook(model, output, input_ids, logits, labels)
    return output
