"""``zo2 plan``: predict a run's placement, memory, traffic and step-time floors (:func:`zo2.plan.make_plan`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..config import STORAGE_DTYPES, ZOConfig, ZOConfigError
from ..plan import OPT_SHAPES, Machine, make_plan, meta_model


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
