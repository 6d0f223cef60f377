"""A cheap fingerprint of a model's weights: which base a seed log was trained from.

For every parameter (by name, in order): its shape and 16 of its values, evenly spaced over the flattened
tensor (first and last included), in the dtype the run stores its masters in, hashed with sha256. Reading
them costs 16 elements a tensor, so it is taken when an engine is built and checked before ``zo2 replay``
applies a seed log. Two bases with other names or shapes differ visibly (the names and shapes are kept
beside the digest); the same architecture with other weights, or the fine-tuned model itself (every
trained value moved), gives another digest.
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
    """The fingerprint of ``(name, shape, sampled values)`` per parameter."""
    digest, shapes = hashlib.sha256(), {}
    for name, shape, values in samples:
        shapes[name] = list(shape)
        digest.update(json.dumps([name, list(shape), str(values.dtype)]).encode())
        digest.update(values.contiguous().view(torch.uint8).numpy().tobytes())
    return {"version": VERSION, "samples": SAMPLES, "parameters": shapes, "digest": digest.hexdigest()}


def model_fingerprint(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The fingerprint of ``model``'s parameters (a tied parameter once), sampled in ``dtype`` (default:
    each parameter's own)."""
    return fingerprint((name, tuple(p.shape), sample(p, dtype)) for name, p in model.named_parameters())


def mismatch(recorded: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """Why ``actual`` is not the base ``recorded`` describes (names, shapes, then values), or None."""
    want, have = recorded["parameters"], actual["parameters"]
    if want.keys() != have.keys():
        missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        return (f"other parameters ({len(have)} against {len(want)} in the run's base; missing {missing[:3]}, "
                f"not in the run {extra[:3]}): another architecture or depth")
    shapes = [name for name in want if list(want[name]) != list(have[name])]
    if shapes:
        return f"other shapes ({shapes[0]}: {have[shapes[0]]} against {want[shapes[0]]} in the run's base)"
    if recorded["digest"] != actual["digest"]:
        return ("the same shapes but other weights (its fingerprint differs): another checkpoint, or a model "
                "these updates were already applied to (a fine-tuned checkpoint)")
    return None
