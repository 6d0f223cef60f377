"""ZOConfig: every knob of a zeroth-order run, typed, documented and validated."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch

from ..kernels import BACKENDS, default_backend
from ..methods import METHODS as _REGISTRY
from ..methods import build_options, defaults_for, method_class
from ..updates import schedules
from .zo2_fields import accepts_zo2_fields

METHODS = tuple(_REGISTRY)
NOISE_KINDS = ("gaussian", "rademacher")
PERTURBATION_SCOPES = ("auto", "unit", "module")
OFFLOAD_IO = ("auto", "direct", "buffered")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float64": torch.float64}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "fp64": "float64", "double": "float64", "float": "float32"}


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(size: int | str) -> int:
    """``"18GB"`` -> 18e9, ``"512MiB"`` -> 512 * 2**20, ``1024`` -> 1024; ValueError otherwise."""
    if isinstance(size, bool):
        raise ValueError(f"not a size: {size!r}")
    if isinstance(size, int):
        number, unit = size, ""
    else:
        text = str(size).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        number, unit = float(digits) if digits else -1.0, text[len(digits):]
    if unit not in _UNITS or number < 0:
        raise ValueError(f"not a size: {size!r}")
    return int(number * _UNITS[unit])


class ZOConfigError(ValueError):
    """A ZOConfig field holds a value that cannot work; the message names the field and the fix."""


def _bad(name: str, value: object, expected: str) -> ZOConfigError:
    return ZOConfigError(f"ZOConfig.{name}={value!r} is invalid: expected {expected}")


def _check_device(name: str, value: str) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise _bad(name, value, "'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise _bad(name, value, "'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ZOConfigError(f"ZOConfig.{name}={value!r} asks for CUDA, but torch.cuda.is_available() is "
                                f"False on this machine; use {name}='cpu' or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _bad(name, value, f"a CUDA index below {torch.cuda.device_count()}")
    return device


@accepts_zo2_fields
@dataclass
class ZOConfig:
    """Configuration of zeroth-order (MeZO-style) training with optional block offloading.

    Compatible with ZO2's documented usage:
    ``ZOConfig(method="mezo-sgd", zo2=True, offloading_device="cpu", working_device="cuda", lr=1e-7)``;
    ZO2's other fields (``zo_method``, ``overlap``, ``amp``, ...) are accepted as :mod:`zo2.config.zo2_fields`
    maps them. A field set after construction is validated at once.
    """

    method: str = "mezo-sgd"
    """The zeroth-order method (:mod:`zo2.methods`): ``"mezo-sgd"`` (MeZO, q-SPSA with ``num_directions``),
    ``"fzoo"`` (N one-sided Rademacher perturbations + one clean evaluation, step normalised by their
    spread), ``"sparse-mezo"`` (only small-magnitude weights perturbed and trained), ``"adamezo"``
    (Adam-style moments rebuilt from the last steps of the update log), ``"meazo"`` (q-SPSA with a
    scalar adaptive step)."""
    method_options: Mapping[str, Any] = field(default_factory=dict)
    """The method's own options (the fields of its ``Options`` dataclass in :mod:`zo2.methods`), e.g.
    ``{"sparsity": 0.75}`` for sparse-mezo or ``{"horizon": 10}`` for adamezo; unknown keys are refused."""
    zo2: bool = True
    """Offload transformer blocks to ``offloading_device`` and stream them through the working device.
    With ``False`` every unit stays resident on ``working_device`` (plain MeZO)."""
    lr: float | Literal["auto"] | None = None
    """Learning rate eta of ``theta <- theta - eta * (g * z + weight_decay * theta)`` (each method scales
    it its own way: :data:`zo2.methods.DEFAULTS`). ``None``: the method's default; ``"auto"``: a short
    search before training picks it (:func:`zo2.tuning.search_lr`; docs/guides/learning-rate.md). The lr
    an engine trains with, and where it came from, are ``ZOEngine.lr`` and ``ZOEngine.lr_source``."""
    eps: float | None = None
    """Perturbation scale epsilon: the two forwards see ``theta + eps * z`` and ``theta - eps * z``.
    ``None``: the method's default (1e-3 for every method today)."""
    average_last: float = 0.0
    """Iterate averaging: the fraction (0, 1] of the last steps whose iterates
    :func:`zo2.tuning.average_iterates` (and ``zo2 finetune --average-last``) average into the final
    weights, replayed from the update log with no copy of the model; 0: off (the last iterate)."""
    weight_decay: float = 0.0
    """Decoupled L2 factor lambda, applied only to weight matrices/embeddings (parameters with 2 or more
    dimensions), never to biases or normalisation parameters."""
    noise: Literal["gaussian", "rademacher"] | None = None
    """Distribution of z: standard normal (MeZO) or random signs (+1/-1). ``None``: the method's own
    (Gaussian, Rademacher for fzoo)."""
    seed: int = 0
    """Base seed. Step t perturbs with a seed derived from (seed, t): the same seed reproduces a run."""
    working_device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Device that runs the forward passes: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    offloading_device: str = "cpu"
    """Where offloaded blocks' master weights live between uses: ``"cpu"`` (pinned host memory when the
    working device is CUDA) or ``"disk"`` (files in ``offload_dir``, read ahead into staging buffers;
    with ``host_memory_budget`` the leading offloaded blocks that fit stay in host memory)."""
    offload_dir: str | None = None
    """Folder of the disk-offloaded masters (``offloading_device="disk"``): one file per block, on a fast
    local disk. It must exist and be writable by one engine at a time; its space is checked at start-up."""
    offload_io: Literal["auto", "direct", "buffered"] = "auto"
    """How disk-offloaded masters are read and written. ``"direct"``: O_DIRECT, DMA straight into zo2's
    aligned buffers, no page cache; ``"buffered"``: through the page cache with kernel read-ahead, each
    file's pages dropped (posix_fadvise DONTNEED) after every read and write; ``"auto"``: direct where
    the filesystem accepts it, else buffered. Both bound host memory; which is faster depends on the
    disk (``bench/disk_bench.py`` measures both)."""
    offloading_blocks: Sequence[int] | None = None
    """Indices of the transformer blocks to offload (negative indices count from the end); ``None``
    offloads every block. Ignored when ``zo2`` is False. Embedding and head units stay resident."""
    storage_dtype: str | None = None
    """dtype of the master weights (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``); ``None``
    keeps the model's dtype. bf16/fp16 masters receive updates with stochastic rounding."""
    frozen_dtype: str | None = None
    """dtype of the masters of frozen parameters (``requires_grad=False``: never perturbed nor updated, so
    they can be stored in a lower precision than trainable ones, e.g. ``"bfloat16"`` base weights under
    float32 adapters); ``None``: as ``storage_dtype``."""
    offload_trainable: bool | None = None
    """Where the trainable parameters of an offloaded block that also holds frozen ones live. ``None``
    (auto): resident on the working device (adapters are small), so only frozen weights stream, up only,
    and nothing is written back; ``True``: they stream with the block (and are written back); ``False``:
    resident (as auto)."""
    num_slots: int = 2
    """Reusable working-device buffers for offloaded blocks, each as large as the largest block:
    ``num_slots - 1`` blocks are uploaded ahead of the one being computed (>= 1)."""
    perturbation_scope: Literal["auto", "unit", "module"] = "auto"
    """How much of the model exists perturbed at once. ``"unit"``: a unit's +eps and -eps copies are
    written once per walk from one z (two copies of a block in memory, z generated once).
    ``"module"``: each weight matrix is perturbed by the module that owns it, for each half, right
    before that module runs (one matrix in memory, z generated twice; vectors stay per unit).
    ``"auto"``: ``"module"`` when any block is offloaded to a CUDA working device (memory-bound), else
    ``"unit"`` (on a CPU working device generating z dominates a step). Same bits either way. Models
    whose code reads a weight matrix outside its own module (rare; detected at start-up) use ``"unit"``."""
    write_back_every: int = 1
    """Write an offloaded block's updated master back every k steps; in between the host master lags and
    its pending updates are replayed from their seeds on each upload (k-1 of k device-to-host copies
    saved). ``flush`` (eval, save) always writes back. 1 writes back every step."""
    gpu_memory_budget: int | str | None = None
    """Working-device memory zo2 may fill with weights and their buffers (``"18GB"``, ``"512MiB"`` or
    bytes): when ``offloading_blocks`` is None, as many blocks stay resident as fit, the rest are
    offloaded. Activations are not included: ``zo2 plan`` estimates them for a batch shape."""
    host_memory_budget: int | str | None = None
    """Host memory zo2 may fill (``"64GB"`` or bytes): offloaded masters kept in host memory, the staging
    buffers of disk reads, and on a CPU working device everything the working device holds. With
    ``offloading_device="disk"`` the leading offloaded blocks that fit stay in host memory, the rest live
    on disk; ``None``: every offloaded block goes to disk. Python, torch and activations are not included."""
    num_directions: int | None = None
    """Directions z (seeds) per step. mezo-sgd and its kin (q-SPSA): each direction's update uses
    ``lr / q``, so a step applies the mean of q projected-gradient estimates (2q perturbed evaluations);
    fzoo: N one-sided perturbations (>= 2). ``None``: the method's default (1; 8 for fzoo)."""
    max_parts_per_walk: int | None = None
    """Cap on the evaluations (parts: θ + s·ε·z_k) computed in one walk over the model. A step's parts
    run in as few walks as the cap allows; each walk replicates the batch once per part, so activation
    memory grows with it, while offloaded blocks are uploaded once per walk. ``None``: all of a step's
    parts in one walk (q-SPSA's 2q, fzoo's N + 1)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over ``schedule_steps`` (after ``warmup_steps`` of linear warm-up), down to
    ``final_lr_ratio * lr``. An engine's ``lr_schedule`` callable, or a Trainer's scheduler, overrides it."""
    eps_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Perturbation-scale schedule (eps decay) over ``schedule_steps``, down to ``final_eps_ratio * eps``."""
    schedule_steps: int | None = None
    """Length of the linear/cosine schedules in steps (required by them); later steps keep the final value."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up from 0 before the schedule starts (eps is not warmed up)."""
    final_lr_ratio: float = 0.0
    """The learning rate at the end of a linear/cosine schedule, as a fraction of ``lr``."""
    final_eps_ratio: float = 0.1
    """eps at the end of a linear/cosine eps schedule, as a fraction of ``eps`` (> 0)."""
    perturbation_parallel: int = 1
    """Distributed (``zo2.distributed``): 2 splits each step's +eps and -eps passes over two groups of
    ranks; 1 computes both on every rank."""
    direction_parallel: int = 1
    """Distributed: groups of ranks that share out the ``num_directions`` directions (must divide it)."""
    sliced_transfers: bool = False
    """Distributed, offloaded: the ranks of a node keep one copy of the offloaded masters in shared host
    memory; each uploads 1/N of a block and the slices are all-gathered on the devices."""
    distributed_timeout: float = 600.0
    """Distributed: seconds after which a collective waiting for a dead or hung rank raises (> 0)."""
    kernels: Literal["auto", "cpu", "torch", "triton"] = field(default_factory=default_backend)
    """Backend of the update and perturbation passes (:mod:`zo2.kernels`). ``"auto"``: the fused Triton
    kernel for CUDA buffers, the fused C++ kernel for CPU buffers (built on first use with the system's
    C++ compiler; without one, logged once, plain torch), plain torch otherwise; ``"cpu"``: always the
    fused C++ kernel (an error if it cannot be built); ``"torch"``: always plain eager torch (the
    reference); ``"triton"``: always Triton (CPU tensors only under ``TRITON_INTERPRET=1``). The CPU
    kernel and the torch path give the same bits. The default is the environment variable
    ``ZO2_KERNELS`` when set, else ``"auto"``; the choice is recorded in the config, so a seed log says
    what produced its bits."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise :class:`ZOConfigError` naming the field and the allowed values.

        Fields left to the method (``noise``, ``num_directions`` = None) are resolved here."""
        self._validate_method()
        self._validate_schedules()
        if self.noise not in NOISE_KINDS:
            raise _bad("noise", self.noise, f"one of {list(NOISE_KINDS)}")
        if self.kernels not in BACKENDS:
            raise _bad("kernels", self.kernels, f"one of {list(BACKENDS)}")
        if self.perturbation_scope not in PERTURBATION_SCOPES:
            raise _bad("perturbation_scope", self.perturbation_scope, f"one of {list(PERTURBATION_SCOPES)}")
        self._validate_lr()
        for name in ("eps", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _bad(name, value, "a finite number")
        if self.eps <= 0:
            raise _bad("eps", self.eps, "a number > 0 (typically 1e-3)")
        if self.weight_decay < 0:
            raise _bad("weight_decay", self.weight_decay, "a number >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise _bad("seed", self.seed, "an integer >= 0")
        for name in ("num_slots", "num_directions", "write_back_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(name, value, "an integer >= 1")
        if self.max_parts_per_walk is not None and (isinstance(self.max_parts_per_walk, bool) or not isinstance(
                self.max_parts_per_walk, int) or self.max_parts_per_walk < 1):
            raise _bad("max_parts_per_walk", self.max_parts_per_walk, "None or an integer >= 1")
        method = method_class(self.method)
        if self.num_directions < method.min_directions:
            raise _bad("num_directions", self.num_directions,
                       f"an integer >= {method.min_directions} for method {self.method!r}")
        if self.perturbation_parallel not in (1, 2) or isinstance(self.perturbation_parallel, bool):
            raise _bad("perturbation_parallel", self.perturbation_parallel, "1 or 2")
        if self.perturbation_parallel == 2 and not method.two_sided:
            raise _bad("perturbation_parallel", 2, f"1 for method {self.method!r}, whose perturbations are "
                       "one-sided (use direction_parallel to share its directions out)")
        if isinstance(self.direction_parallel, bool) or not isinstance(self.direction_parallel, int) or not (
                1 <= self.direction_parallel <= self.num_directions):
            raise _bad("direction_parallel", self.direction_parallel,
                       f"an integer in [1, num_directions={self.num_directions}]")
        if not isinstance(self.sliced_transfers, bool):
            raise _bad("sliced_transfers", self.sliced_transfers, "True or False")
        timeout = self.distributed_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise _bad("distributed_timeout", timeout, "a finite number of seconds > 0")
        for name in ("gpu_memory_budget", "host_memory_budget"):
            if getattr(self, name) is not None:
                try:
                    setattr(self, name, parse_bytes(getattr(self, name)))
                except ValueError:
                    raise _bad(name, getattr(self, name),
                               "None, a number of bytes or a size such as '18GB' or '512MiB'") from None
        _check_device("working_device", self.working_device)
        self._validate_disk()
        if self.offloading_blocks is not None:
            if isinstance(self.offloading_blocks, (str, bytes)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in self.offloading_blocks):
                raise _bad("offloading_blocks", self.offloading_blocks, "None or a list of block indices")
        for name in ("storage_dtype", "frozen_dtype"):
            value = getattr(self, name)
            if value is not None:
                value = str(value).replace("torch.", "")
                value = _DTYPE_ALIASES.get(value, value)
                setattr(self, name, value)
                if value not in STORAGE_DTYPES:
                    raise _bad(name, value, f"None or one of {list(STORAGE_DTYPES)}")
        if self.offload_trainable not in (None, True, False):
            raise _bad("offload_trainable", self.offload_trainable, "None, True or False")

    def _validate_disk(self) -> None:
        if self.offload_io not in OFFLOAD_IO:
            raise _bad("offload_io", self.offload_io, f"one of {list(OFFLOAD_IO)}")
        if self.offloading_device != "disk":
            _check_device("offloading_device", self.offloading_device)
            return
        if not isinstance(self.offload_dir, (str, os.PathLike)) or not str(self.offload_dir):
            raise _bad("offload_dir", self.offload_dir, "the folder for offloading_device='disk' (an existing, "
                       "writable folder on a fast local disk)")
        self.offload_dir = os.fspath(self.offload_dir)
        if self.sliced_transfers:
            raise _bad("sliced_transfers", True, "False with offloading_device='disk' (sliced transfers share "
                       "host-memory masters between processes)")
        if self.method == "sparse-mezo":
            raise _bad("offloading_device", "disk", "'cpu' for method 'sparse-mezo', whose thresholds are computed "
                       "from every weight at start-up")

    @property
    def offloads_to_disk(self) -> bool:
        """Whether offloaded blocks may live on disk (``offloading_device="disk"``)."""
        return self.zo2 and self.offloading_device == "disk"

    def _validate_method(self) -> None:
        if self.method not in METHODS:
            raise _bad("method", self.method, f"one of {list(METHODS)}")
        method = method_class(self.method)
        if not isinstance(self.method_options, Mapping):
            raise _bad("method_options", self.method_options, "a mapping of option names to values")
        self.method_options = dict(self.method_options)
        try:
            build_options(method, self.method_options)
        except (TypeError, ValueError) as err:
            raise ZOConfigError(str(err)) from None
        if self.noise is None:
            self.noise = method.default_noise
        if self.num_directions is None:
            self.num_directions = method.default_directions
        if self.eps is None:
            self.eps = defaults_for(self.method).eps

    def _validate_lr(self) -> None:
        lr, average = self.lr, self.average_last
        if lr is not None and lr != "auto" and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                                                or not math.isfinite(lr) or lr < 0):
            raise _bad("lr", lr, "None (the method's default), 'auto' (a search before training) or a finite "
                       "number >= 0")
        if isinstance(average, bool) or not isinstance(average, (int, float)) or not 0 <= average <= 1:
            raise _bad("average_last", average, "a fraction of the last steps in [0, 1] (0: off, e.g. 0.5)")
        if average and (not method_class(self.method).fused_kernels or self.weight_decay):
            raise _bad("average_last", average, f"0 for method {self.method!r} with weight_decay={self.weight_decay}: "
                       "averaging replays updates of the form lr * g * z (mezo-sgd, fzoo or meazo without weight decay)")

    def _validate_schedules(self) -> None:
        for name in ("lr_scheduler", "eps_scheduler"):
            if getattr(self, name) not in schedules.SCHEDULES:
                raise _bad(name, getattr(self, name), f"one of {list(schedules.SCHEDULES)}")
        steps = self.schedule_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise _bad("schedule_steps", steps, "None or an integer >= 1")
        if steps is None and {self.lr_scheduler, self.eps_scheduler} != {"constant"}:
            raise _bad("schedule_steps", steps, "the schedule's length in steps (linear and cosine need it)")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise _bad("warmup_steps", self.warmup_steps, "an integer >= 0")
        for name, low in (("final_lr_ratio", 0.0), ("final_eps_ratio", 1e-300)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= 1:
                raise _bad(name, value, f"a number in [{'0' if low == 0 else '>0'}, 1]")

    def lr_factor(self, step: int) -> float:
        """The factor of ``lr`` at ``step`` under ``lr_scheduler`` and ``warmup_steps``."""
        return schedules.schedule(self.lr_scheduler, steps=self.schedule_steps, final=self.final_lr_ratio,
                                  warmup=self.warmup_steps)(step)

    def eps_at(self, step: int) -> float:
        """The perturbation scale of ``step`` under ``eps_scheduler``."""
        return self.eps * schedules.schedule(self.eps_scheduler, steps=self.schedule_steps,
                                             final=self.final_eps_ratio)(step)

    def offloaded_block_indices(self, num_blocks: int) -> list[int]:
        """The sorted, non-negative indices of the blocks to offload in a model with ``num_blocks``."""
        if not self.zo2:
            return []
        if self.offloading_blocks is None:
            return list(range(num_blocks))
        chosen = set()
        for index in self.offloading_blocks:
            if not -num_blocks <= index < num_blocks:
                raise _bad("offloading_blocks", list(self.offloading_blocks),
                           f"indices in [-{num_blocks}, {num_blocks}) for this model of {num_blocks} blocks")
            chosen.add(index % num_blocks)
        return sorted(chosen)

    @property
    def torch_storage_dtype(self) -> torch.dtype | None:
        """``storage_dtype`` as a torch.dtype (None keeps the model's)."""
        return None if self.storage_dtype is None else STORAGE_DTYPES[self.storage_dtype]

    @property
    def torch_frozen_dtype(self) -> torch.dtype | None:
        """The dtype of frozen parameters' masters (``frozen_dtype``, else ``storage_dtype``)."""
        return STORAGE_DTYPES[self.frozen_dtype] if self.frozen_dtype is not None else self.torch_storage_dtype

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of the fields (for checkpoints and logs)."""
        data = dataclasses.asdict(self)
        data["method_options"] = dict(self.method_options)
        if data["offloading_blocks"] is not None:
            data["offloading_blocks"] = list(data["offloading_blocks"])
        return data
