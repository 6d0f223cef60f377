"""Time the fused update + perturbation (the noise hot path) on one flat buffer.

    python bench/noise_bench.py                      # one SmolLM2-135M block, CPU, torch path
    python bench/noise_bench.py --numel 50000000 --device cuda --noise rademacher
    python bench/noise_bench.py --numel 1000000000 --device cuda --dtype bfloat16 --kernels torch triton

With several ``--kernels`` the paths run on the same buffer and pending update, and the script
reports how far their outputs are apart (0 for Rademacher; float32 rounding for Gaussian).
GB/s counts the bytes the fused pass must move: the buffer read, written back when updates are
pending, and each perturbed copy written (the floor is the device's copy bandwidth).
``--kernels triton`` on a CPU device needs ``TRITON_INTERPRET=1`` (slow: use ``--numel 10000``).
"""
from __future__ import annotations

import argparse
import time

import torch

from zo2 import Update, kernels
from zo2.kernels import update_and_perturb
from zo2.storage import Unit


def _time(fn, repeats: int, cuda: bool) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call (which compiles)."""
    times = []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=3_540_096, help="elements (default: a SmolLM2-135M block)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--noise", default="gaussian", choices=["gaussian", "rademacher"])
    parser.add_argument("--kernels", nargs="+", default=["auto"], choices=list(kernels.BACKENDS),
                        help="backends to time (ZOConfig.kernels)")
    parser.add_argument("--updates", type=int, default=1, help="pending updates applied in the pass")
    parser.add_argument("--signs", default="both", choices=["both", "plus", "minus"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    signs = {"both": (1, -1), "plus": (1,), "minus": (-1,)}[args.signs]
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    start = torch.randn(args.numel, device=args.device).to(dtype)
    updates = [Update(seed, 0.5, 1e-6) for seed in range(args.updates)]
    moved = args.numel * dtype.itemsize * (1 + (1 if updates else 0) + len(signs))
    outputs = {}
    for choice in args.kernels:
        buffer = start.clone()
        unit = Unit(index=1, name="bench", params=[], master=buffer, offloaded=False, n_decay=args.numel)

        def run(buffer=buffer, unit=unit):
            return update_and_perturb(buffer, unit, updates, 12345, 1e-3, noise_kind=args.noise, weight_decay=0.1,
                                      signs=signs, backend=choice)

        best = _time(run, args.repeats, cuda)
        path = "triton" if kernels.use_triton(buffer, choice) else "torch"
        perturbed = run(buffer.copy_(start))  # once more from the same start, to compare the paths
        outputs[choice] = [buffer, *perturbed]  # kept on the device: host copies of 1e9 elements are slow
        print(f"{choice} ({path}): update x{args.updates} + perturb {args.signs} of {args.numel:,} {args.dtype} "
              f"elements on {args.device} ({args.noise}): {best * 1e3:.2f} ms, {best / args.numel * 1e9:.2f} "
              f"ns/element, {moved / best / 1e9:.3g} GB/s")
    if len(outputs) > 1:
        first, *others = outputs
        for other in others:
            gap = max((a.float() - b.float()).abs().max().item() for a, b in zip(outputs[first], outputs[other]))
            print(f"max |{first} - {other}| over the buffer and the perturbed copies: {gap:.3g}")


if __name__ == "__main__":
    main()
