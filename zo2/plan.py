"""Placement under a memory budget, and a step's predicted memory, traffic and time floors.

Everything here works from parameter shapes alone, so a plan for a 175B model is made on the meta
device before a byte of weights is allocated::

    plan = zo2.plan.make_plan(zo2.plan.meta_model("path/to/model"), ZOConfig(...), batch_size=1, seq_len=2048)
    print(plan.describe())

The working device holds the resident units, ``num_slots`` slots for streamed blocks, and the two
perturbed copies (+eps, -eps) of the units in flight; the engine uses ``resident_block_count`` to keep
as many leading blocks resident as ``ZOConfig.gpu_memory_budget`` allows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .config import STORAGE_DTYPES, ZOConfig, ZOConfigError
from .models import find_blocks

#: OPT shapes (hidden, layers, heads; ffn = 4 x hidden) for random-init benchmarks and plans.
OPT_SHAPES = {"tiny": (64, 4, 4), "125m": (768, 12, 12), "350m": (1024, 24, 16), "1.3b": (2048, 24, 32),
              "2.7b": (2560, 32, 32), "6.7b": (4096, 32, 32), "13b": (5120, 40, 40), "30b": (7168, 48, 56),
              "66b": (9216, 64, 72), "175b": (12288, 96, 96)}


class BudgetError(ZOConfigError):
    """The memory budget cannot hold even a fully offloaded model's working set."""


@dataclass(frozen=True)
class Machine:
    """Rates that turn bytes and FLOPs into time floors (defaults: one H100 80GB on PCIe Gen5 x16, as
    measured for the benchmark: pinned copies 55 GB/s each way, 94 GB/s both at once)."""

    h2d_gbps: float = 55.0
    d2h_gbps: float = 55.0
    duplex_gbps: float = 94.0
    matmul_tflops: float = 799.0
    memory_gbps: float = 3350.0
    """Device memory bandwidth: the fused noise passes are bound by it."""


def opt_config(size: str, depth: int | None = None):
    """An ``OPTConfig`` of a reference size ("1.3b", "175b", ...), optionally cut to ``depth`` blocks."""
    from transformers import OPTConfig

    if size not in OPT_SHAPES:
        raise ValueError(f"unknown OPT size {size!r}: expected one of {list(OPT_SHAPES)}")
    hidden, layers, heads = OPT_SHAPES[size]
    return OPTConfig(hidden_size=hidden, num_hidden_layers=depth or layers, num_attention_heads=heads,
                     ffn_dim=4 * hidden, word_embed_proj_dim=hidden, vocab_size=50272, max_position_embeddings=2048)


def meta_model(source: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A model with parameter shapes only (meta device): ``source`` is a local HF model directory, an
    ``opt-<size>`` reference shape (e.g. ``opt-13b``) or a hub id (needs network)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if source.startswith("opt-") and source[4:] in OPT_SHAPES:
        config = opt_config(source[4:])
    else:
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read a model config from {source!r}: give a local model directory "
                             f"(with config.json), opt-<size> with size in {list(OPT_SHAPES)}, or a hub id "
                             f"with network access ({error})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))


def param_bytes(params: Sequence[nn.Parameter], dtype: torch.dtype | None) -> int:
    """Bytes of ``params`` stored in ``dtype`` (None: their own dtypes)."""
    return sum(p.numel() * (dtype or p.dtype).itemsize for p in params)


def unit_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[int, list[int]]:
    """(bytes of everything outside the blocks, bytes of each block) in the storage ``dtype``."""
    _, blocks = find_blocks(model)
    seen: set[int] = set()
    per_block = []
    for block in blocks:
        params = [p for p in block.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        per_block.append(param_bytes(params, dtype))
    rest = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in seen]
    return param_bytes(rest, dtype), per_block


def human_bytes(size: float) -> str:
    """``1.5e9`` -> ``"1.50 GB"`` (decimal units, as GPU memory is usually quoted)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def working_bytes(fixed: int, resident: Sequence[int], streamed: Sequence[int], num_slots: int) -> int:
    """Working-device bytes of weights and zo2's buffers: the non-block units (``fixed``) and resident
    blocks, the slots (if any block streams) and the two perturbed copies of the units in flight
    (bounded by every non-block unit, as a tied embedding lives for the whole walk, plus one block)."""
    slots = num_slots * max(streamed) if streamed else 0
    return fixed + sum(resident) + slots + 2 * (fixed + max([*resident, *streamed], default=0))


def resident_block_count(fixed: int, blocks: Sequence[int], budget: int, num_slots: int) -> int:
    """The most leading blocks that can stay resident within ``budget`` bytes (the rest stream).

    Raises :class:`BudgetError` when even streaming every block does not fit."""
    for resident in range(len(blocks), -1, -1):
        if working_bytes(fixed, blocks[:resident], blocks[resident:], num_slots) <= budget:
            return resident
    minimum = working_bytes(fixed, [], blocks, num_slots)
    raise BudgetError(f"ZOConfig.gpu_memory_budget={human_bytes(budget)} is below the {human_bytes(minimum)} this "
                      f"model needs with every block offloaded (non-block units {human_bytes(fixed)} resident, "
                      f"{num_slots} slots, two perturbed copies in flight); raise the budget or lower num_slots")


def offloaded_blocks(config: ZOConfig, fixed: int, blocks: Sequence[int]) -> list[int]:
    """Block indices to offload: ``config.offloading_blocks``, or with ``gpu_memory_budget`` set (and
    no explicit choice) every block after the leading ones the budget holds."""
    if not config.zo2 or config.offloading_blocks is not None or config.gpu_memory_budget is None:
        return config.offloaded_block_indices(len(blocks))
    return list(range(resident_block_count(fixed, blocks, config.gpu_memory_budget, config.num_slots), len(blocks)))


def _dims(config) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    inner = next((getattr(text, k) for k in ("intermediate_size", "ffn_dim", "n_inner") if getattr(text, k, None)),
                 4 * hidden)
    return {"hidden": hidden, "inner": int(inner), "vocab": int(text.vocab_size),
            "heads": int(getattr(text, "num_attention_heads", 1))}


def activation_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """A rough peak of activations in one dual walk: hidden states of the doubled batch, one half's MLP
    intermediate (halves run one after the other), the doubled batch's logits and one half's float32 loss
    copy; attention scores are not counted (SDPA / flash attention do not materialise them)."""
    d, size = _dims(config), dtype.itemsize
    tokens = batch_size * seq_len
    hidden = 2 * tokens * d["hidden"] * size * 4
    mlp = tokens * d["inner"] * size * 2
    logits = 2 * tokens * d["vocab"] * size + 2 * tokens * d["vocab"] * 4
    return hidden + mlp + logits


@dataclass(frozen=True)
class Plan:
    """Predicted placement, memory, traffic and floors of one training step (bytes, seconds, FLOPs)."""

    num_blocks: int
    resident_blocks: int
    weights_bytes: int
    """All stored weights (masters), wherever they live."""
    working_weights_bytes: int
    """Working device: resident masters, slots and perturbed copies."""
    activation_bytes: int
    """Working device: estimated activation peak (see ``activation_bytes``)."""
    host_bytes: int
    """Offloading device: the offloaded masters."""
    upload_bytes: int
    download_bytes: int
    flops: float
    transfer_floor_s: float
    compute_floor_s: float
    noise_floor_s: float

    @property
    def step_floor_s(self) -> float:
        """The larger of the transfer floor and compute + noise (transfers overlap compute)."""
        return max(self.transfer_floor_s, self.compute_floor_s + self.noise_floor_s)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "step_floor_s": self.step_floor_s}

    def describe(self) -> str:
        """A human-readable table."""
        rows = [
            ("blocks resident / streamed", f"{self.resident_blocks} / {self.num_blocks - self.resident_blocks}"),
            ("stored weights", human_bytes(self.weights_bytes)),
            ("working device: weights + buffers", human_bytes(self.working_weights_bytes)),
            ("working device: activations (est.)", human_bytes(self.activation_bytes)),
            ("working device: total (est.)", human_bytes(self.working_weights_bytes + self.activation_bytes)),
            ("host: offloaded masters", human_bytes(self.host_bytes)),
            ("moved per step: up / down", f"{human_bytes(self.upload_bytes)} / {human_bytes(self.download_bytes)}"),
            ("forward FLOPs per step", f"{self.flops / 1e12:.1f} TFLOP"),
            ("floor: transfers", f"{self.transfer_floor_s * 1e3:.1f} ms"),
            ("floor: compute (matmuls)", f"{self.compute_floor_s * 1e3:.1f} ms"),
            ("floor: noise passes", f"{self.noise_floor_s * 1e3:.1f} ms"),
            ("floor: step", f"{self.step_floor_s * 1e3:.1f} ms"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _forward_flops(model: nn.Module, config, tokens: int, seq_len: int, num_blocks: int) -> float:
    """2 FLOPs per multiply-add of every weight matrix except embedding lookups, plus causal attention."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices = {id(p): p for p in model.parameters() if p.dim() >= 2}.values()
    matmul = sum(p.numel() for p in matrices if id(p) not in lookups)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and id(output.weight) in lookups:
        matmul += output.weight.numel()  # a head tied to the embedding is a lookup and a matmul
    attention = 2 * seq_len * _dims(config)["hidden"] * num_blocks  # QK^T and AV, causal half
    return 2.0 * tokens * (matmul + attention)


def make_plan(model: nn.Module, config: ZOConfig, *, batch_size: int = 1, seq_len: int = 2048,
              micro_batches: int = 1, machine: Machine = Machine(),
              activation_dtype: torch.dtype | None = None) -> Plan:
    """Predict one step of ``config`` on ``model`` (a meta-device model is enough) for a batch shape."""
    dtype = config.torch_storage_dtype
    fixed, blocks = unit_bytes(model, dtype)
    n = len(blocks)
    offloaded = set(offloaded_blocks(config, fixed, blocks))
    streamed = [b for i, b in enumerate(blocks) if i in offloaded]
    resident_bytes = [b for i, b in enumerate(blocks) if i not in offloaded]
    working = working_bytes(fixed, resident_bytes, streamed, config.num_slots)
    walks = config.num_directions * micro_batches
    up = sum(streamed) * walks
    down = sum(streamed) // config.write_back_every
    act_dtype = activation_dtype or next(model.parameters()).dtype
    tokens = 2 * batch_size * seq_len * walks  # both perturbed passes
    flops = _forward_flops(model, model.config, tokens, seq_len, n)
    total = fixed + sum(blocks)
    transfer = max(up / (machine.h2d_gbps * 1e9), down / (machine.d2h_gbps * 1e9),
                   (up + down) / (machine.duplex_gbps * 1e9)) if streamed else 0.0
    # per walk the fused pass reads each master and writes two perturbed copies (+ the update's write)
    noise_bytes = total * (3 * walks + 1)
    return Plan(num_blocks=n, resident_blocks=n - len(streamed), weights_bytes=total,
                working_weights_bytes=working, activation_bytes=activation_bytes(model.config, batch_size, seq_len, act_dtype),
                host_bytes=sum(streamed), upload_bytes=up, download_bytes=down, flops=flops,
                transfer_floor_s=transfer, compute_floor_s=flops / (machine.matmul_tflops * 1e12),
                noise_floor_s=noise_bytes / (machine.memory_gbps * 1e9))


def add_plan_command(commands: Any) -> None:
    """Add ``zo2 plan`` to the CLI's subcommands (an ``argparse`` subparsers object)."""
    parser = commands.add_parser(
        "plan", help="predict memory, traffic and step-time floors for a model and batch shape",
        description="Predict, before anything is allocated, where a model's blocks go under a memory budget, "
        "the working-device and host memory, the bytes moved per step and the transfer- and compute-bound "
        "floors of the step time. Rates default to an H100 80GB on PCIe Gen5 x16.")
    parser.add_argument("--model", required=True, help="local Hugging Face model folder, opt-<size> "
                        f"({', '.join(OPT_SHAPES)}) or a hub id (needs network)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default: %(default)s)")
    parser.add_argument("--dtype", default="float16", help="compute and storage dtype (default: %(default)s)")
    parser.add_argument("--zo2", action=argparse.BooleanOptionalAction, default=True,
                        help="offload blocks (default: on); --no-zo2 plans resident MeZO")
    parser.add_argument("--gpu-memory-budget", help="e.g. 18GB: keep as many blocks resident as fit")
    parser.add_argument("--num-slots", type=int, default=2, help="working-device slots (default: %(default)s)")
    parser.add_argument("--write-back-every", type=int, default=1, help="k of write-back skipping (default: 1)")
    parser.add_argument("--num-directions", type=int, default=1, help="q directions per step (default: 1)")
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps (default: 1)")
    defaults = Machine()
    for field in dataclasses.fields(Machine):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=float, default=getattr(defaults, field.name),
                            help=f"(default: {getattr(defaults, field.name)})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run_plan)


def run_plan(args: Any) -> int:
    """``zo2 plan``: print the plan of ``args``; returns 0."""
    dtype = STORAGE_DTYPES.get(args.dtype)
    if dtype is None:
        raise ZOConfigError(f"--dtype {args.dtype!r} is invalid: expected one of {list(STORAGE_DTYPES)}")
    config = ZOConfig(zo2=args.zo2, working_device="cpu", storage_dtype=args.dtype, num_slots=args.num_slots,
                      write_back_every=args.write_back_every, num_directions=args.num_directions,
                      gpu_memory_budget=args.gpu_memory_budget)
    machine = Machine(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Machine)})
    model = meta_model(args.model, dtype)
    plan = make_plan(model, config, batch_size=args.batch, seq_len=args.seq, micro_batches=args.micro_batches,
                     machine=machine)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(f"zo2 plan: {args.model}, batch {args.batch} x {args.seq}, {args.dtype}, "
              f"{'offloaded' if args.zo2 else 'resident'}\n{plan.describe()}")
    return 0
