"""Time the fused update + perturbation (the noise hot path) on one flat buffer.

    python bench/noise_bench.py                      # one SmolLM2-135M block, CPU
    python bench/noise_bench.py --numel 50000000 --device cuda --noise rademacher
"""
from __future__ import annotations

import argparse
import time

import torch

from zo2.optim import Update, update_and_perturb
from zo2.storage import Unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=3_540_096, help="elements (default: a SmolLM2-135M block)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--noise", default="gaussian", choices=["gaussian", "rademacher"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    buffer = torch.randn(args.numel, device=args.device).to(getattr(torch, args.dtype))
    unit = Unit(index=1, name="bench", params=[], master=buffer, offloaded=False, n_decay=args.numel)
    times = []
    for repeat in range(args.repeats + 1):  # the first call compiles the generator
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        update_and_perturb(buffer, unit, [Update(repeat, 0.5, 1e-6)], repeat + 1, 1e-3,
                           noise_kind=args.noise, weight_decay=0.0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    best = min(times[1:])
    print(f"update+perturb of {args.numel:,} {args.dtype} elements on {args.device} ({args.noise}): "
          f"{best * 1e3:.1f} ms, {best / args.numel * 1e9:.1f} ns/element")


if __name__ == "__main__":
    main()
