"""Plans: a step's predicted placement, memory, traffic and time floors, before anything is allocated.

Everything here works from parameter shapes alone, so a plan for a 175B model is made on the meta
device before a byte of weights is allocated::

    plan = zo2.plan.make_plan(zo2.plan.meta_model("path/to/model"), ZOConfig(...), batch_size=1, seq_len=2048)
    print(plan.describe())

Where blocks go is decided by the placement policy of :mod:`zo2.offload.budget` (the engine applies the
same rule); its public names are re-exported here, where earlier releases defined them. ``zo2 plan``
(:mod:`zo2.cli.plan`) prints a plan.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .config import ZOConfig
from .objectives.task_loss import LOSS_CHUNK
from .offload.budget import (
    LOCATIONS,
    BudgetError,
    ModelSizes,
    WalkShape,
    block_locations,
    host_bytes,
    human_bytes,
    model_sizes,
    offloaded_blocks,
    perturbed_bytes,
    resident_block_count,
    resolve_scope,
    walk_shape,
    working_bytes,
)

__all__ = ["OPT_SHAPES", "Machine", "Plan", "activation_bytes", "make_plan", "meta_model", "opt_config",
           # the placement policy (zo2.offload.budget), importable from here as before
           "LOCATIONS", "BudgetError", "ModelSizes", "WalkShape", "block_locations", "host_bytes", "human_bytes",
           "model_sizes", "offloaded_blocks", "perturbed_bytes", "resident_block_count", "resolve_scope",
           "walk_shape", "working_bytes"]

#: OPT shapes (hidden, layers, heads; ffn = 4 x hidden) for random-init benchmarks and plans.
OPT_SHAPES = {"tiny": (64, 4, 4), "125m": (768, 12, 12), "350m": (1024, 24, 16), "1.3b": (2048, 24, 32),
              "2.7b": (2560, 32, 32), "6.7b": (4096, 32, 32), "13b": (5120, 40, 40), "30b": (7168, 48, 56),
              "66b": (9216, 64, 72), "175b": (12288, 96, 96)}


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
    float32 chunk the loss works on (``zo2.objectives.task_loss.LOSS_CHUNK``). Attention scores are not counted (SDPA /
    flash attention do not materialise them)."""
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


