"""Placement under a memory budget, and a step's predicted memory, traffic and time floors.

Everything here works from parameter shapes alone, so a plan for a 175B model is made on the meta
device before a byte of weights is allocated::

    plan = zo2.plan.make_plan(zo2.plan.meta_model("path/to/model"), ZOConfig(...), batch_size=1, seq_len=2048)
    print(plan.describe())

The working device holds the resident units, ``num_slots`` slots for streamed blocks, and the perturbed
copies in flight (see ``perturbed_bytes``: whole units in unit scope, one module's matrices in module
scope); the engine uses ``offloaded_blocks`` to keep as many leading blocks resident as
``ZOConfig.gpu_memory_budget`` allows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Collection, Sequence

import torch
from torch import nn

from . import methods
from .config import STORAGE_DTYPES, ZOConfig, ZOConfigError
from .aligned import padded
from .history import UpdateLog
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
    disk_read_gbps: float = 6.0
    """Sequential read rate of the offload disk (an assumed PCIe Gen4 NVMe SSD; measure yours with
    ``bench/disk_bench.py``)."""
    disk_write_gbps: float = 4.0
    """Sequential write rate of the offload disk (assumed, as ``disk_read_gbps``)."""


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


def param_bytes(params: Sequence[nn.Parameter], dtype: torch.dtype | None,
                frozen_dtype: torch.dtype | None = None) -> int:
    """Bytes of ``params`` stored in ``dtype`` (frozen ones in ``frozen_dtype``; None: their own dtypes)."""
    return sum(p.numel() * ((dtype if p.requires_grad else frozen_dtype or dtype) or p.dtype).itemsize
               for p in params)


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of a model's weights as zo2 places and perturbs them, in the storage dtype."""

    fixed: int
    """Everything outside the blocks (embedding and head units): always resident."""
    blocks: tuple[int, ...]
    """Each block."""
    fixed_vectors: int
    """The part of ``fixed`` in parameters of fewer than two dims (biases, norms)."""
    block_vectors: int
    """The most bytes of such parameters one block holds."""
    module_matrices: int
    """The most bytes of weight matrices one module owns directly: module scope's perturbed copy."""


def model_sizes(model: nn.Module, dtype: torch.dtype | None = None,
                frozen_dtype: torch.dtype | None = None) -> ModelSizes:
    """The :class:`ModelSizes` of ``model`` (a meta-device model is enough); frozen parameters counted in
    ``frozen_dtype`` when given."""
    def size(params: Sequence[nn.Parameter]) -> int:
        return param_bytes(params, dtype, frozen_dtype)

    _, blocks = find_blocks(model)
    seen: set[int] = set()
    per_block, block_vectors = [], 0
    for block in blocks:
        params = [p for p in block.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        per_block.append(size(params))
        block_vectors = max(block_vectors, size([p for p in params if p.dim() < 2]))
    rest = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in seen]
    module_matrices = max((size([p for p in m.parameters(recurse=False) if p.dim() >= 2 and p.requires_grad])
                           for m in model.modules()), default=0)
    return ModelSizes(fixed=size(rest), blocks=tuple(per_block), fixed_vectors=size([p for p in rest if p.dim() < 2]),
                      block_vectors=block_vectors, module_matrices=module_matrices)


def human_bytes(size: float) -> str:
    """``1.5e9`` -> ``"1.50 GB"`` (decimal units, as GPU memory is usually quoted)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def resolve_scope(config: ZOConfig, streams: bool, module_scope_ok: bool = True, accelerator: bool = True) -> str:
    """``config.perturbation_scope`` resolved: "auto" is "module" when any block ``streams`` to an
    ``accelerator`` (device memory is what is short there); on a CPU working device, where generating
    z dominates the step, "unit" (z once per walk). Plans assume an accelerator."""
    scope = config.perturbation_scope
    if scope == "auto":
        scope = "module" if streams and accelerator else "unit"
    return "unit" if scope == "module" and not module_scope_ok else scope


@dataclass(frozen=True)
class WalkShape:
    """How a step of a config runs: its parts (evaluations) and the walks they take."""

    parts: int
    """Evaluations per step (2q for q-SPSA, N + 1 for fzoo)."""
    per_walk: int
    """Parts computed in one walk (``max_parts_per_walk`` caps it): the batch is replicated this often."""
    walks: int
    """Walks per (micro-)batch: each uploads every offloaded block once."""
    perturbed_per_walk: int
    """Perturbed copies a walk makes of each unit at most (clean parts read the weights themselves)."""


def walk_shape(config: ZOConfig) -> WalkShape:
    """The :class:`WalkShape` of ``config``'s method, directions and ``max_parts_per_walk``."""
    method = methods.method_class(config.method)(config, UpdateLog(config.num_directions))
    parts = method.parts(list(range(config.num_directions)))
    per_walk = min(config.max_parts_per_walk or len(parts), len(parts))
    perturbed = sum(1 for part in parts if part.sign)
    return WalkShape(len(parts), per_walk, -(-len(parts) // per_walk), min(per_walk, perturbed))


def perturbed_bytes(sizes: ModelSizes, scope: str, copies: int = 2) -> int:
    """Bytes of perturbed copies in flight with ``copies`` perturbed parts per walk. Unit scope: the copies
    of every non-block unit (a tied embedding is read again by the head, so its copies live for the whole
    walk) and of one block. Module scope: the copies of those units' vectors, and one module's matrices."""
    if scope == "unit":
        return copies * (sizes.fixed + max(sizes.blocks, default=0))
    return sizes.module_matrices + copies * (sizes.fixed_vectors + sizes.block_vectors)


def working_bytes(sizes: ModelSizes, offloaded: Collection[int], num_slots: int, scope: str, copies: int = 2) -> int:
    """Working-device bytes of weights and zo2's buffers with the ``offloaded`` blocks streaming: the
    non-block units and resident blocks, the slots (if any block streams) and the perturbed copies."""
    streamed = [size for i, size in enumerate(sizes.blocks) if i in offloaded]
    slots = num_slots * max(streamed) if streamed else 0
    return sizes.fixed + sum(sizes.blocks) - sum(streamed) + slots + perturbed_bytes(sizes, scope, copies)


def resident_block_count(sizes: ModelSizes, budget: int, config: ZOConfig, module_scope_ok: bool = True,
                         accelerator: bool = True) -> int:
    """The most leading blocks that can stay resident within ``budget`` bytes (the rest stream).

    Raises :class:`BudgetError` when even streaming every block does not fit."""
    count, copies = len(sizes.blocks), walk_shape(config).perturbed_per_walk
    for resident in range(count, -1, -1):
        scope = resolve_scope(config, resident < count, module_scope_ok, accelerator)
        if working_bytes(sizes, range(resident, count), config.num_slots, scope, copies) <= budget:
            return resident
    minimum = working_bytes(sizes, range(count), config.num_slots, resolve_scope(config, count > 0, module_scope_ok,
                                                                                 accelerator), copies)
    raise BudgetError(f"ZOConfig.gpu_memory_budget={human_bytes(budget)} is below the {human_bytes(minimum)} this "
                      f"model needs with every block offloaded (non-block units {human_bytes(sizes.fixed)} "
                      f"resident, {config.num_slots} slots, perturbed copies in flight); raise the budget or "
                      "lower num_slots")


def offloaded_blocks(config: ZOConfig, sizes: ModelSizes, module_scope_ok: bool = True,
                     accelerator: bool = True) -> list[int]:
    """Block indices to offload: ``config.offloading_blocks``, or with ``gpu_memory_budget`` set (and
    no explicit choice) every block after the leading ones the budget holds."""
    count = len(sizes.blocks)
    if not config.zo2 or config.offloading_blocks is not None or config.gpu_memory_budget is None:
        return config.offloaded_block_indices(count)
    resident = resident_block_count(sizes, config.gpu_memory_budget, config, module_scope_ok, accelerator)
    return list(range(resident, count))


#: Where a block lives: resident on the working device, offloaded to host memory, or offloaded to disk.
LOCATIONS = ("device", "host", "disk")


def host_bytes(sizes: ModelSizes, locations: Sequence[str], config: ZOConfig, scope: str, copies: int = 2,
               accelerator: bool = True) -> int:
    """Host bytes zo2 holds with blocks at ``locations``: the masters of blocks offloaded to host memory,
    the ``num_slots`` staging buffers that disk reads land in (aligned, each the largest disk block),
    and on a CPU working device everything the working device holds (there it is host memory; its slots
    are the staging buffers)."""
    held = sum(size for size, where in zip(sizes.blocks, locations) if where == "host")
    on_disk = [size for size, where in zip(sizes.blocks, locations) if where == "disk"]
    if not accelerator:
        offloaded = [i for i, where in enumerate(locations) if where != "device"]
        return held + working_bytes(sizes, offloaded, config.num_slots, scope, copies)
    return held + (config.num_slots * padded(max(on_disk)) if on_disk else 0)


def block_locations(config: ZOConfig, sizes: ModelSizes, module_scope_ok: bool = True,
                    accelerator: bool = True) -> list[str]:
    """Where each block lives (one of :data:`LOCATIONS`): the working device holds the leading blocks
    ``gpu_memory_budget`` allows (:func:`offloaded_blocks`); with ``offloading_device="disk"`` the leading
    offloaded blocks that ``host_memory_budget`` holds stay in host memory and the rest live on disk
    (every offloaded block without a host budget). Raises :class:`BudgetError` when the host budget
    cannot hold even the staging buffers (and, on a CPU working device, the working set)."""
    offloaded = offloaded_blocks(config, sizes, module_scope_ok, accelerator)
    spill = "disk" if config.offloads_to_disk else "host"
    locations = ["device" if i not in offloaded else spill for i in range(len(sizes.blocks))]
    budget = config.host_memory_budget
    if budget is None:
        return locations
    scope = resolve_scope(config, bool(offloaded), module_scope_ok, accelerator)
    copies = walk_shape(config).perturbed_per_walk
    for kept in range(len(offloaded) if spill == "disk" else 0, -1, -1):
        trial = [("host" if i in offloaded[:kept] else where) for i, where in enumerate(locations)]
        if host_bytes(sizes, trial, config, scope, copies, accelerator) <= budget:
            return trial
    needed = host_bytes(sizes, locations, config, scope, copies, accelerator)
    fix = ("raise it or lower num_slots" if spill == "disk" else
           "raise it, or set offloading_device='disk' (and offload_dir) to keep blocks on disk")
    raise BudgetError(f"ZOConfig.host_memory_budget={human_bytes(budget)} is below the {human_bytes(needed)} zo2 needs "
                      f"in host memory with {'every offloaded block on disk' if spill == 'disk' else 'these blocks'} "
                      f"({config.num_slots} staging buffers{', and the working set on a CPU working device' if not accelerator else ''}); {fix}")


def _dims(config) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    inner = next((getattr(text, k) for k in ("intermediate_size", "ffn_dim", "n_inner") if getattr(text, k, None)),
                 4 * hidden)
    return {"hidden": hidden, "inner": int(inner), "vocab": int(text.vocab_size),
            "heads": int(getattr(text, "num_attention_heads", 1))}


def activation_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype, parts: int = 2) -> int:
    """A rough peak of activations in one walk of ``parts`` parts: hidden states of the replicated batch,
    one part's MLP intermediate (parts run one after the other), and the larger of the logits' two peaks:
    every part's plus their concatenation while the head merges them, or the merged logits plus the
    float32 chunk the loss works on (``zo2.losses.LOSS_CHUNK``). Attention scores are not counted (SDPA /
    flash attention do not materialise them)."""
    from .losses import LOSS_CHUNK

    d, size = _dims(config), dtype.itemsize
    tokens = batch_size * seq_len
    hidden = parts * tokens * d["hidden"] * size * 4
    mlp = tokens * d["inner"] * size * 2
    logits = parts * tokens * d["vocab"] * size
    return hidden + mlp + max(2 * logits, logits + 2 * 4 * min(LOSS_CHUNK, tokens * d["vocab"]))


@dataclass(frozen=True)
class Plan:
    """Predicted placement, memory, traffic and floors of one training step (bytes, seconds, FLOPs)."""

    num_blocks: int
    resident_blocks: int
    scope: str
    """The perturbation scope the engine would use ("unit" or "module")."""
    weights_bytes: int
    """All stored weights (masters), wherever they live."""
    working_weights_bytes: int
    """Working device: resident masters, slots and perturbed copies."""
    activation_bytes: int
    """Working device: estimated activation peak (see ``activation_bytes``)."""
    host_bytes: int
    """Host memory: masters offloaded to it, plus the staging buffers of disk reads."""
    disk_blocks: int
    """Blocks whose masters live on disk (``offloading_device="disk"``)."""
    disk_bytes: int
    """The disk-offloaded masters."""
    disk_read_bytes: int
    disk_write_bytes: int
    upload_bytes: int
    download_bytes: int
    flops: float
    transfer_floor_s: float
    compute_floor_s: float
    noise_floor_s: float
    disk_floor_s: float
    """Disk reads and writes of a step at the disk's rates (they share the disk, so their times add)."""

    @property
    def step_floor_s(self) -> float:
        """The largest of the transfer floor, the disk floor and compute + noise (they all overlap)."""
        return max(self.transfer_floor_s, self.disk_floor_s, self.compute_floor_s + self.noise_floor_s)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "step_floor_s": self.step_floor_s}

    def describe(self) -> str:
        """A human-readable table."""
        rows = [
            ("blocks resident / streamed", f"{self.resident_blocks} / {self.num_blocks - self.resident_blocks}"),
            ("blocks on working device / host / disk", f"{self.resident_blocks} / "
             f"{self.num_blocks - self.resident_blocks - self.disk_blocks} / {self.disk_blocks}"),
            ("perturbation scope", self.scope),
            ("stored weights", human_bytes(self.weights_bytes)),
            ("working device: weights + buffers", human_bytes(self.working_weights_bytes)),
            ("working device: activations (est.)", human_bytes(self.activation_bytes)),
            ("working device: total (est.)", human_bytes(self.working_weights_bytes + self.activation_bytes)),
            ("host: offloaded masters + staging", human_bytes(self.host_bytes)),
            ("disk: offloaded masters", human_bytes(self.disk_bytes)),
            ("moved per step: up / down", f"{human_bytes(self.upload_bytes)} / {human_bytes(self.download_bytes)}"),
            ("disk per step: read / written", f"{human_bytes(self.disk_read_bytes)} / "
             f"{human_bytes(self.disk_write_bytes)}"),
            ("forward FLOPs per step", f"{self.flops / 1e12:.1f} TFLOP"),
            ("floor: transfers", f"{self.transfer_floor_s * 1e3:.1f} ms"),
            ("floor: compute (matmuls)", f"{self.compute_floor_s * 1e3:.1f} ms"),
            ("floor: noise passes", f"{self.noise_floor_s * 1e3:.1f} ms"),
            ("floor: disk", f"{self.disk_floor_s * 1e3:.1f} ms"),
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
    sizes = model_sizes(model, dtype, config.torch_frozen_dtype)
    fixed, blocks = sizes.fixed, sizes.blocks
    n = len(blocks)
    locations = block_locations(config, sizes)
    offloaded = {i for i, where in enumerate(locations) if where != "device"}
    streamed = [b for i, b in enumerate(blocks) if i in offloaded]
    on_disk = sum(b for b, where in zip(blocks, locations) if where == "disk")
    scope = resolve_scope(config, bool(streamed))
    shape = walk_shape(config)
    copies = shape.perturbed_per_walk
    working = working_bytes(sizes, offloaded, config.num_slots, scope, copies)
    walks = shape.walks * micro_batches
    up = sum(streamed) * walks
    down = sum(streamed) // config.write_back_every
    disk_read, disk_write = on_disk * walks, on_disk // config.write_back_every
    act_dtype = activation_dtype or next(model.parameters()).dtype
    tokens = shape.parts * batch_size * seq_len * micro_batches  # every part's forward
    flops = _forward_flops(model, model.config, tokens, seq_len, n)
    total = fixed + sum(blocks)
    transfer = max(up / (machine.h2d_gbps * 1e9), down / (machine.d2h_gbps * 1e9),
                   (up + down) / (machine.duplex_gbps * 1e9)) if streamed else 0.0
    # unit scope: per walk one fused pass reads each master and writes its copies (+ the update's write);
    # module scope: the update reads and writes each master once, then each part reads it and writes a copy
    noise_bytes = total * ((1 + copies) * walks + 1) if scope == "unit" else total * (2 * copies * walks + 2)
    return Plan(num_blocks=n, resident_blocks=n - len(streamed), scope=scope, weights_bytes=total,
                working_weights_bytes=working,
                activation_bytes=activation_bytes(model.config, batch_size, seq_len, act_dtype, shape.per_walk),
                host_bytes=host_bytes(sizes, locations, config, scope, copies), disk_blocks=locations.count("disk"),
                disk_bytes=on_disk, disk_read_bytes=disk_read, disk_write_bytes=disk_write,
                upload_bytes=up, download_bytes=down, flops=flops,
                transfer_floor_s=transfer, compute_floor_s=flops / (machine.matmul_tflops * 1e12),
                noise_floor_s=noise_bytes / (machine.memory_gbps * 1e9),
                disk_floor_s=disk_read / (machine.disk_read_gbps * 1e9) + disk_write / (machine.disk_write_gbps * 1e9))


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
    parser.add_argument("--offloading-device", default="cpu", choices=["cpu", "disk"],
                        help="where offloaded blocks live (default: %(default)s)")
    parser.add_argument("--host-memory-budget", help="e.g. 64GB: with --offloading-device disk, keep the offloaded "
                        "blocks that fit in host memory, the rest on disk")
    parser.add_argument("--num-slots", type=int, default=2, help="working-device slots (default: %(default)s)")
    parser.add_argument("--write-back-every", type=int, default=1, help="k of write-back skipping (default: 1)")
    parser.add_argument("--perturbation-scope", default="auto", choices=["auto", "unit", "module"],
                        help="ZOConfig.perturbation_scope (default: %(default)s)")
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
                      gpu_memory_budget=args.gpu_memory_budget, perturbation_scope=args.perturbation_scope,
                      host_memory_budget=args.host_memory_budget, offloading_device=args.offloading_device,
                      offload_dir="(planned)" if args.offloading_device == "disk" else None)  # never opened
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
