"""Time the fused update + perturbation (the noise hot path) on one flat buffer.

    python bench/noise_bench.py                      # one SmolLM2-135M block, CPU: Gaussian and Rademacher,
                                                     # float32 and bfloat16 (+ the rounding uniforms)
    python bench/noise_bench.py --kernels cpu torch  # the fused CPU kernel beside the torch reference
    python bench/noise_bench.py --numel 50000000 --device cuda --noise rademacher
    python bench/noise_bench.py --numel 1000000000 --device cuda --dtype bfloat16 --kernels torch triton

Each row is one pass: ``--updates`` pending updates applied in place, then the perturbed copies written
into preallocated outputs (as an engine reusing its buffers does). bfloat16 rows include the stochastic
rounding of every update (one rounding uniform per element and update), so bf16 minus float32 is the
cost of the uniforms and the rounding. ``cpu ns/el`` is process CPU time (all threads), robust to a
loaded machine; wall times are the best of ``--repeats``. With several ``--kernels`` the paths run on
the same buffer and pending update, and the script reports how far their outputs are apart (0 between
the CPU kernel and the torch path; float32 rounding between Triton and the others for Gaussian z).
GB/s counts the bytes the fused pass must move: the buffer read, written back when updates are
pending, and each perturbed copy written (the floor is the device's copy bandwidth).
``--kernels triton`` on a CPU device needs ``TRITON_INTERPRET=1`` (slow: use ``--numel 10000``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from zo2 import Update, kernels
from zo2.kernels import update_and_perturb
from zo2.units.storage import Unit


def _time(fn, repeats: int, cuda: bool) -> tuple[float, float]:
    """(best wall time, median process CPU time) of ``repeats`` calls after one warm-up call."""
    times, cpu = [], []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(times[1:]), statistics.median(cpu[1:])


def _bench(args: argparse.Namespace, kind: str, dtype_name: str) -> None:
    signs = {"both": (1, -1), "plus": (1,), "minus": (-1,)}[args.signs]
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, dtype_name)
    start = torch.randn(args.numel, device=args.device).to(dtype)
    updates = [Update(seed, 0.5, 1e-6) for seed in range(args.updates)]
    moved = args.numel * dtype.itemsize * (1 + (1 if updates else 0) + len(signs))
    outputs = {}
    for choice in args.kernels:
        buffer = start.clone()
        out = [torch.empty_like(buffer) for _ in signs]
        unit = Unit(index=1, name="bench", params=[], master=buffer, offloaded=False, n_decay=args.numel)

        def run(buffer=buffer, unit=unit, out=out):
            return update_and_perturb(buffer, unit, updates, 12345, 1e-3, noise_kind=kind, weight_decay=0.1,
                                      signs=signs, out=out, backend=choice)

        best, cpu = _time(run, args.repeats, cuda)
        path = kernels.resolve(buffer, choice, kind, out)
        perturbed = run(buffer.copy_(start))  # once more from the same start, to compare the paths
        outputs[choice] = [buffer, *perturbed]  # kept on the device: host copies of 1e9 elements are slow
        print(f"| {choice} ({path}) | {kind} | {dtype_name} | {best * 1e3:.2f} | {best / args.numel * 1e9:.2f} | "
              f"{cpu / args.numel * 1e9:.2f} | {moved / best / 1e9:.3g} |")
    if len(outputs) > 1:
        first, *others = outputs
        for other in others:
            gap = max((a.float() - b.float()).abs().max().item() for a, b in zip(outputs[first], outputs[other]))
            print(f"max |{first} - {other}| over the buffer and the perturbed copies ({kind}, {dtype_name}): {gap:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=3_540_096, help="elements (default: a SmolLM2-135M block)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--noise", nargs="+", default=["gaussian", "rademacher"], choices=["gaussian", "rademacher"])
    parser.add_argument("--kernels", nargs="+", default=["auto"], choices=list(kernels.BACKENDS),
                        help="backends to time (ZOConfig.kernels)")
    parser.add_argument("--updates", type=int, default=1, help="pending updates applied in the pass")
    parser.add_argument("--signs", default="both", choices=["both", "plus", "minus"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"update x{args.updates} + perturb {args.signs} of {args.numel:,} elements on {args.device}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print("| kernels (path) | noise | dtype | ms | ns/el | cpu ns/el | GB/s |\n|---|---|---|---|---|---|---|")
    for kind in args.noise:
        for dtype_name in args.dtype:
            _bench(args, kind, dtype_name)


if __name__ == "__main__":
    main()
