"""AdaMeZO (Cai et al., "AdaMeZO: Adam-style Zeroth-Order Optimizer for LLM Fine-tuning Without
Maintaining the Moments", arXiv 2605.00650), implemented from the paper's description.

MeZO's two-sided estimate per step, ĝ_t = Σ_d w_d g_{t,d} z_{t,d} (w_d = each direction's share of
the step's lr: 1/q), fed to Adam-style moments that are never stored: at update time they are rebuilt
over a finite horizon h from the update log by regenerating the last h steps' z,

    m_t = (1 - β1) Σ_{i<h} β1^i ĝ_{t-i},    v_t = (1 - β2) Σ_{i<h} β2^i ĝ_{t-i}²,
    θ ← θ - lr_t (m_t / sqrt(v_t + δ) + λ θ).

No optimizer state (the log is the state), so it offloads and replays like MeZO-SGD; the cost is h
noise generations per element per update (fewer when several pending updates share a chunk pass):
cheap in a fused GPU pass, about h times MeZO's noise work in this plain-torch rule on a CPU.

Use it where MeZO needs many steps: the paper reports up to 70% fewer forward passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..kernels import generate, update_and_perturb
from ..units.storage import Unit
from .base import Method, chunks_of, decay, options_error, store, working_copy


@dataclass(frozen=True)
class AdaMeZOOptions:
    """Options of ``method="adamezo"``."""

    horizon: int = 10
    """h: how many of the latest steps the moments are rebuilt from (>= 1); the cost of an update grows
    with it (h z regenerations per element)."""
    beta1: float = 0.9
    """Decay of the first moment, in [0, 1)."""
    beta2: float = 0.99
    """Decay of the second moment, in [0, 1)."""
    delta: float = 1e-8
    """Added to v before the square root (> 0)."""

    def check(self) -> None:
        if self.horizon < 1:
            raise options_error("adamezo", f"horizon={self.horizon!r} must be >= 1")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise options_error("adamezo", f"{name}={getattr(self, name)!r} must be in [0, 1)")
        if not self.delta > 0:
            raise options_error("adamezo", f"delta={self.delta!r} must be > 0")


class AdaMeZO(Method):
    """q-SPSA estimates with Adam-style moments rebuilt from the last ``horizon`` steps of the log."""

    name = "adamezo"
    Options = AdaMeZOOptions
    fused_kernels = False

    def _estimate(self, step: int, unit: Unit, start: int, count: int, device: torch.device) -> torch.Tensor:
        """ĝ of ``step`` for elements [start, start + count) of ``unit`` (float32)."""
        updates = self.log.step_updates(step)
        total_lr = sum(u.lr for u in updates)
        estimate = torch.zeros(count, dtype=torch.float32, device=device)
        for update in updates:
            weight = update.lr / total_lr if total_lr else 1.0 / len(updates)
            z = generate(self.config.noise, update.seed, unit.index, start, count, device=device,
                                 backend=self.config.kernels)
            estimate.add_(z, alpha=weight * update.projected_grad)
        return estimate

    def apply(self, buffer: torch.Tensor, unit: Unit, steps: range, *, offset: int = 0) -> None:
        opts = self.options
        for start, chunk in chunks_of(buffer, offset):
            estimates: dict[int, torch.Tensor] = {}  # ĝ per step, shared by the pending steps of this chunk
            for step in steps:
                window = range(max(0, step - opts.horizon + 1), step + 1)
                for old in [s for s in estimates if s < window.start]:
                    del estimates[old]
                first = torch.zeros(chunk.numel(), dtype=torch.float32, device=chunk.device)
                second = torch.zeros_like(first)
                for past in window:
                    if past not in estimates:
                        estimates[past] = self._estimate(past, unit, start, chunk.numel(), chunk.device)
                    age = step - past
                    first.add_(estimates[past], alpha=opts.beta1 ** age)
                    second.addcmul_(estimates[past], estimates[past], value=opts.beta2 ** age)
                direction = first.mul_(1 - opts.beta1).div_(second.mul_(1 - opts.beta2).add_(opts.delta).sqrt_())
                updates = self.log.step_updates(step)
                lr = sum(u.lr for u in updates)
                work = working_copy(chunk)
                decay(work, unit, start, 1.0 - lr * self.config.weight_decay)
                work.add_(direction.to(work.dtype), alpha=-lr)
                store(chunk, work, unit, start, updates[0].seed, self.config.kernels)

    def update_and_perturb(self, buffer: torch.Tensor, unit: Unit, steps: range, seed: int, eps: float,
                           signs: Sequence[int], *, offset: int = 0,
                           out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        self.apply(buffer, unit, steps, offset=offset)
        return update_and_perturb(buffer, unit, (), seed, eps, signs=signs, offset=offset, out=out,
                                          **self._kernel_args())
