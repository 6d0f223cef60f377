"""The fused CPU kernel (the ``"cpu"`` backend of :mod:`zo2.kernels`): one pass per 1024-element block.

Per block, in registers and L1: counters -> Philox-4x32-10 -> Box-Muller | signs -> pending updates
(decay on [0, n_decay), stochastic rounding for bf16/fp16) -> theta + eps*z and/or theta - eps*z
written; z never exists beyond a block. Blocks are shared out over ``torch.get_num_threads()``
threads; values depend on the absolute element index only, so not on the thread count or on how a
caller slices a unit. Semantics and bits are those of :mod:`zo2.kernels.torch_path`.

The kernel is ``cpu_kernel.cpp`` (plain C++17, no torch headers: it builds in about a second),
compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) for
the vector extensions torch itself uses on this CPU, and cached under ``$XDG_CACHE_HOME/zo2/kernels``
(default ``~/.cache/zo2/kernels``) by a hash of the source, compiler and flags. Without a compiler, or
if the build fails, :func:`available` is False (logged once) and ``"auto"`` uses the torch path.

Why not ``torch.utils.cpp_extension``: it compiles torch's headers (a minute on two cores) and needs
ninja, for a kernel that only reads and writes raw buffers; ctypes releases the GIL during the call.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..units.storage import Unit
from ..updates.log import Update
from .torch_path import signed_outputs

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KINDS = {"gaussian": 0, "rademacher": 1, "uniform": 2}
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-math-errno",
               "-fno-trapping-math")
# torch's CPU capability -> the same vector extensions for the kernel (values do not depend on them:
# no operation is contracted, and fma is used exactly where torch's add(..., alpha=) fuses)
_ARCH_FLAGS = {"AVX2": ("-mavx2", "-mfma", "-mf16c"),
               "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c")}


def cache_dir() -> Path:
    """Where built kernels are kept: ``$XDG_CACHE_HOME/zo2/kernels``, default ``~/.cache/zo2/kernels``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zo2" / "kernels"


def _compiler() -> str | None:
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def _arch_flags() -> tuple[str, ...]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()  # aarch64 and others: the baseline ISA (NEON and fma on aarch64)
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", "AVX512_BF16", ...
    if capability.startswith(("AVX512", "AMX")):
        return _ARCH_FLAGS["AVX512"]
    return _ARCH_FLAGS.get(capability, ())


def torch_fuses_alpha_add() -> bool | None:
    """Whether ``torch.add(a, b, alpha=c)`` rounds ``a + b*c`` once (fma) on this CPU: True, False, or
    None when vectorised body and tail differ (then no kernel can match every position)."""
    b = torch.full((133,), 1.0 + 2.0**-12)  # b*c = 1 + 2^-11 + 2^-24: the 2^-24 is lost unless fused
    a = torch.full((133,), -(1.0 + 2.0**-11))
    fused = torch.add(a, b, alpha=1.0 + 2.0**-12) != 0
    in_place = a.clone().add_(b, alpha=1.0 + 2.0**-12) != 0
    if bool(fused.all()) and bool(in_place.all()):
        return True
    return False if not bool(fused.any()) and not bool(in_place.any()) else None


def _build(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # same file system: atomic rename
        partial = Path(scratch) / target.name
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(partial, target)  # concurrent builders (ranks, test workers) each rename a whole file


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    p, i32, i64, u32, u64, f32 = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint64,
                                  ctypes.c_float)
    library.zo2_update_perturb.argtypes = [p, p, p, i32, i64, i64, i64, u32, i32, i32, p, p, p, i32, f32, i32]
    library.zo2_update_perturb.restype = None
    library.zo2_noise.argtypes = [p, i32, u64, u32, u32, i64, i64]
    library.zo2_noise.restype = None
    return library


@functools.cache
def _library() -> ctypes.CDLL:
    """Build (once per machine, cached) and load the kernel; raises RuntimeError saying why it cannot."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    fused = torch_fuses_alpha_add()
    if fused is None:
        raise RuntimeError("torch's add(..., alpha=) rounds differently in its vectorised body and tail on "
                           "this CPU, so no kernel can reproduce it")
    flags = [*_BASE_FLAGS, *_arch_flags(), f"-DZO2_FUSED_MULADD={int(fused)}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), os.path.realpath(compiler), *flags]).encode()).hexdigest()
    target = cache_dir() / f"cpu_kernel-{key[:16]}.so"
    if not target.is_file():
        logger.info("building the fused CPU kernel with %s (once; cached in %s)", compiler, target.parent)
        try:
            _build(compiler, flags, target)
        except OSError:  # an unwritable cache: build for this process only
            target = Path(tempfile.mkdtemp(prefix="zo2-kernels-")) / target.name
            _build(compiler, flags, target)
    return _declare(ctypes.CDLL(str(target)))


@functools.cache
def available() -> bool:
    """Whether the kernel is built and loaded (building it on first call); logs once why not."""
    try:
        _library()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        logger.warning("the fused CPU kernel is unavailable (%s); using the torch path (same bits, slower)", err)
        return False
    return True


def supports(buffer: torch.Tensor, out: Sequence[torch.Tensor] | None, noise_kind: str) -> str | None:
    """None if the kernel takes this call, else what it cannot take."""
    tensors = [buffer, *(out or ())]
    if buffer.device.type != "cpu" or buffer.dtype not in DTYPES:
        return f"{buffer.dtype} buffers on {buffer.device} (it takes float32/bfloat16/float16 on the CPU)"
    if noise_kind not in ("gaussian", "rademacher"):
        return f"noise_kind {noise_kind!r} (it takes 'gaussian' or 'rademacher')"
    if any(t.dim() != 1 or not t.is_contiguous() or t.dtype != buffer.dtype or t.numel() != buffer.numel()
           or t.device != buffer.device for t in tensors):
        return "other than contiguous 1-D buffers and outputs of one dtype and length"
    return None


def _check(buffer: torch.Tensor, out: Sequence[torch.Tensor] | None, noise_kind: str) -> None:
    problem = supports(buffer, out, noise_kind)
    if problem is not None:
        raise ValueError(f"the fused CPU kernel does not take {problem}; set ZOConfig.kernels='torch' for these")


def _run(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], seed: int | None, eps: float,
         outputs: dict[int, torch.Tensor], noise_kind: str, weight_decay: float, offset: int) -> None:
    if buffer.numel() == 0 or (not updates and not outputs):
        return
    seeds = [int(u.seed) & 0xFFFFFFFFFFFFFFFF for u in updates] + [int(seed or 0) & 0xFFFFFFFFFFFFFFFF]
    # Python floats rounded to float32 as torch rounds the scalar of a float32 mul_/add_
    coefs = [-u.lr * u.projected_grad for u in updates] or [0.0]
    decays = [1.0 - u.lr * weight_decay for u in updates] or [1.0]
    _library().zo2_update_perturb(
        buffer.data_ptr(), outputs[1].data_ptr() if 1 in outputs else None,
        outputs[-1].data_ptr() if -1 in outputs else None, DTYPES[buffer.dtype], buffer.numel(), offset,
        unit.n_decay, int(unit.index) & 0xFFFFFFFF, KINDS[noise_kind], len(updates),
        (ctypes.c_uint64 * len(seeds))(*seeds), (ctypes.c_float * len(coefs))(*coefs),
        (ctypes.c_float * len(decays))(*decays), int(bool(weight_decay)), float(eps), torch.get_num_threads())


def update_and_perturb(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], seed: int, eps: float, *,
                       noise_kind: str, weight_decay: float, signs: Sequence[int] = (1, -1),
                       offset: int = 0, out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """:func:`zo2.kernels.torch_path.update_and_perturb` in one fused pass: returns ``buffer + sign*eps*z``
    per sign (written into ``out`` when given)."""
    _check(buffer, out, noise_kind)
    outputs = signed_outputs(buffer, signs, out)
    _run(buffer, unit, updates, seed, eps, outputs, noise_kind, weight_decay, offset)
    return [outputs[sign] for sign in signs]


def apply_updates(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], *, noise_kind: str,
                  weight_decay: float, offset: int = 0) -> None:
    """:func:`zo2.kernels.torch_path.apply_updates` in one fused pass (all updates applied per block in order)."""
    _check(buffer, None, noise_kind)
    _run(buffer, unit, updates, None, 0.0, {}, noise_kind, weight_decay, offset)


def generate(kind: str, seed: int, unit: int, start: int, count: int, *, stream: int = 0) -> torch.Tensor:
    """:func:`zo2.updates.noise.generate` by the kernel's own generator (to check it against the torch one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {sorted(KINDS)}")
    if count < 0 or start < 0:
        raise ValueError(f"noise range must be non-negative, got start={start}, count={count}")
    out = torch.empty(count, dtype=torch.float32)
    _library().zo2_noise(out.data_ptr(), KINDS[kind], int(seed) & 0xFFFFFFFFFFFFFFFF, int(unit) & 0xFFFFFFFF,
                         stream, start, count)
    return out
