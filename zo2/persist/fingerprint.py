"""A cheap fingerprint of a model's weights: which base a seed log was trained from.

For every parameter (by name, in order): its shape and 16 of its values, evenly spaced over the flattened
tensor (first and last included), in the dtype the run stores its masters in, hashed with sha256. Reading
them costs 16 elements a tensor, so it is taken when an engine is built and checked before ``zo2 replay``
applies a seed log. Two bases with other names or shapes differ in ``structure`` (a digest of the names
and shapes); the same architecture with other weights, or the fine-tuned model itself (every trained
value moved), in ``digest``.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import torch
from torch import nn

SAMPLES = 16
"""Values sampled per tensor."""
VERSION = 1


def positions(numel: int) -> list[int]:
    """The flat indices sampled from a tensor of ``numel`` elements."""
    if numel == 0:
        return []
    return sorted({i * (numel - 1) // (SAMPLES - 1) for i in range(SAMPLES)})


def sample(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The sampled values of ``tensor`` in ``dtype`` (default: its own), on the CPU."""
    flat = tensor.detach().reshape(-1)
    values = flat[torch.tensor(positions(flat.numel()), dtype=torch.long, device=flat.device)]
    return values.to(dtype or values.dtype).cpu()


def fingerprint(samples: Iterable[tuple[str, tuple[int, ...], torch.Tensor]]) -> dict[str, Any]:
    """The fingerprint of ``(name, shape, sampled values)`` per parameter: the number of parameters, a
    digest of their names and shapes (``structure``) and one of everything (``digest``); a few hundred bytes
    whatever the model, so a seed log stays small."""
    structure, digest, count = hashlib.sha256(), hashlib.sha256(), 0
    for name, shape, values in samples:
        described = json.dumps([name, list(shape)]).encode()
        structure.update(described)
        digest.update(described + str(values.dtype).encode())
        digest.update(values.contiguous().view(torch.uint8).numpy().tobytes())
        count += 1
    return {"version": VERSION, "samples": SAMPLES, "parameters": count, "structure": structure.hexdigest(),
            "digest": digest.hexdigest()}


def model_fingerprint(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The fingerprint of ``model``'s parameters (a tied parameter once), sampled in ``dtype`` (default:
    each parameter's own)."""
    return fingerprint((name, tuple(p.shape), sample(p, dtype)) for name, p in model.named_parameters())


def mismatch(recorded: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """Why ``actual`` is not the base ``recorded`` describes (names and shapes, then values), or None."""
    if recorded["structure"] != actual["structure"]:
        return (f"other parameter names or shapes ({actual['parameters']} parameters against "
                f"{recorded['parameters']} in the run's base): another architecture or depth")
    if recorded["digest"] != actual["digest"]:
        return ("the same parameters but other weights (its fingerprint differs): another checkpoint, or a model "
                "these updates were already applied to (a fine-tuned checkpoint)")
    return None
