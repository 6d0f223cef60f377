"""PEFT adapters for zeroth-order training: wrap a model, recognise a wrapped one, load adapter weights.

The engine needs nothing of peft to train an adapter (its frozen base weights are ``requires_grad=False``,
so only the adapter is perturbed and updated); these helpers serve ``zo2 finetune --peft`` and the
checkpoints of peft models, which hold only the adapter (peft's own ``save_pretrained`` layout).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

KINDS = ("lora", "ia3")


def available() -> bool:
    """Whether peft can be imported."""
    return importlib.util.find_spec("peft") is not None


def _peft():
    if not available():
        raise ImportError("PEFT adapters need the peft package: pip install 'zo2[peft]'")
    import peft

    return peft


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft wrapper (``PeftModel`` or a subclass)."""
    return available() and isinstance(model, _peft().PeftModel)


def wrap(model: nn.Module, kind: str, *, rank: int = 8, alpha: float = 16.0,
         targets: Sequence[str] | None = None, seed: int = 0) -> nn.Module:
    """``model`` with a fresh ``kind`` adapter (``"lora"``: rank ``rank``, scale ``alpha / rank``; ``"ia3"``)
    on ``targets`` (module names; ``None``: peft's default for the architecture). The adapter's random
    initialisation is a function of ``seed`` (the global RNG is left as it was), so a run is reproducible
    and its seed log replays onto the same initial adapter."""
    peft = _peft()
    if kind == "lora":
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets) if targets else None,
                                 lora_dropout=0.0, task_type="CAUSAL_LM")
    elif kind == "ia3":
        config = peft.IA3Config(target_modules=list(targets) if targets else None, task_type="CAUSAL_LM")
    else:
        raise ValueError(f"adapter kind {kind!r} is unknown; expected one of {list(KINDS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def load_trained(base: nn.Module, folder: str | Path) -> nn.Module:
    """``base`` with the (trainable) adapter saved in ``folder`` by ``save_pretrained``."""
    return _peft().PeftModel.from_pretrained(base, str(folder), is_trainable=True)


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy saved adapter weights into a peft ``model`` in place; returns the adapter parameters that the
    saved weights did not cover (empty when complete)."""
    result = _peft().set_peft_model_state_dict(model, dict(tensors))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return sorted(trainable & set(getattr(result, "missing_keys", [])))


def describe(model: Any) -> str:
    """``"lora (r=8) on q_proj, v_proj"``-style summary of a peft model's active adapter."""
    config = model.peft_config[model.active_adapter]
    kind = str(config.peft_type.value).lower()
    rank = f" (r={config.r})" if hasattr(config, "r") else ""
    return f"{kind}{rank} on {', '.join(sorted(config.target_modules or []))}"
