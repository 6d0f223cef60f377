"""The one place where zo2 touches what differs between supported releases of its dependencies, or
what they keep private. Each entry names the releases it was checked on; the tests that exercise it are
named beside it (``tests/test_compat.py`` for the streaming load's), and run in the suite on whatever
release is installed.

The streaming load (:mod:`zo2.loading`) uses the second half to do what ``from_pretrained`` does without
materialising every weight: the checkpoint-key renamings transformers applies on load, and the
initialisation of buffers that a checkpoint does not hold (rotary ``inv_freq``, embedding scales).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from transformers import trainer_utils

logger = logging.getLogger(__name__)

#: Later transformers releases (5.17 and 5.24 checked) have ``trainer_utils.rotate_checkpoints``; 5.0 has
#: only the private ``Trainer._rotate_checkpoints``. Tested on the installed release by tests/test_trainer.py
#: and tests/test_resume.py (save_total_limit keeps the newest complete checkpoints).
_ROTATE = getattr(trainer_utils, "rotate_checkpoints", None)


def rotate_checkpoints(trainer: Any, run_dir: Path, limit: int | None) -> None:
    """Delete ``trainer``'s oldest checkpoints in ``run_dir`` beyond ``limit`` (by modification time,
    keeping the best one), as Trainer does after each save."""
    if _ROTATE is not None:
        _ROTATE(output_dir=str(run_dir), save_total_limit=limit,
                best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
        return
    saved, trainer.args.save_total_limit = trainer.args.save_total_limit, limit
    try:
        trainer._rotate_checkpoints(use_mtime=True, output_dir=str(run_dir))  # transformers 5.0
    finally:
        trainer.args.save_total_limit = saved


def mark_placed(model: Any) -> None:
    """Tell accelerate (1.10 to 1.15 checked) that ``model`` is prepared, so that Trainer neither moves it
    nor wraps it in DDP: zo2's engine places the weights. Tested by every trainer test (a moved or
    wrapped model would not train through the engine) and the torchrun ones (no DDP)."""
    model._is_accelerate_prepared = True


class UnsupportedCheckpointError(ValueError):
    """The checkpoint needs a conversion on load that zo2's streaming load does not perform."""


def build_on_meta(model_class, config, dtype: torch.dtype):
    """``model_class`` built from ``config`` with every tensor on the meta device, parameters in ``dtype``,
    weights tied, nothing initialised: what ``from_pretrained`` builds before it loads. An auto class
    (``AutoModelForCausalLM``) dispatches on the config; a concrete class uses its private
    ``_from_config`` (transformers 5)."""
    build = getattr(model_class, "from_config", None) or model_class._from_config
    with torch.device("meta"):
        return build(config, dtype=dtype)


def _conversions(model: nn.Module):
    """(renamings, converters) transformers applies to this model's checkpoint keys on load."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers releases without weight conversions: keys are used as they are
        return None
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if not isinstance(t, WeightRenaming)])


def checkpoint_names(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Model state-dict name -> checkpoint key, with the renamings (and base-model prefixes) transformers
    applies on load, e.g. GPT-NeoX's ``embed_out`` -> ``lm_head``. A key that transformers would
    *convert* (fuse MoE experts, split a qkv matrix) raises :class:`UnsupportedCheckpointError`."""
    keys = sorted(keys)  # transformers matches in sorted order (its grouped renamings depend on it)
    conversions = _conversions(model)
    if conversions is None:
        return {key: key for key in keys}
    from transformers.core_model_loading import rename_source_key

    renamings, converters = conversions
    meta_state = dict.fromkeys(model.state_dict(keep_vars=True), True)
    names = {}
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if pattern is not None:
            raise UnsupportedCheckpointError(
                f"checkpoint key {key!r} is converted by transformers on load ({type(model).__name__} stores it as "
                f"{renamed!r}, e.g. fused MoE experts); zo2's streaming load reads tensors as stored. Load the model "
                "with from_pretrained and pass it to ZOEngine instead")
        names[renamed] = key
    return names


def is_persistent(model: nn.Module, name: str) -> bool:
    """Whether buffer ``name`` is saved in state dicts (torch keeps the others in a private set)."""
    module_name, _, attr = name.rpartition(".")
    return attr not in model.get_submodule(module_name)._non_persistent_buffers_set


def initialize_missing_buffers(model: nn.Module, loaded: set[str]) -> None:
    """Give every buffer not in ``loaded`` (still on the meta device) its value on the CPU, the way
    ``from_pretrained`` does: an empty tensor, then the model's own ``initialize_weights`` with every
    parameter and loaded buffer marked as initialised (transformers' ``_is_hf_initialized`` flag), so
    only those buffers are written. A floating buffer that stays unset (NaN-filled beforehand) raises."""
    for param in model.parameters():
        param._is_hf_initialized = True
    created = []
    for name, buffer in list(model.named_buffers(remove_duplicate=False)):
        if name in loaded:
            buffer._is_hf_initialized = True
            continue
        module_name, _, attr = name.rpartition(".")
        value = torch.empty_like(buffer, device="cpu")
        if value.is_floating_point():
            value.fill_(float("nan"))
        model.get_submodule(module_name).register_buffer(attr, value, persistent=is_persistent(model, name))
        created.append(name)
    if not created:
        return
    model.initialize_weights()
    for name in created:
        buffer = model.get_buffer(name)
        if buffer.is_floating_point() and torch.isnan(buffer).any():
            raise UnsupportedCheckpointError(
                f"buffer {name!r} is not in the checkpoint and {type(model).__name__}'s initialisation does not set "
                "it; zo2's streaming load cannot rebuild it. Load the model with from_pretrained and pass it to "
                "ZOEngine instead")
    logger.debug("initialised buffers not in the checkpoint: %s", created)
