"""Step-time benchmark of zo2 on OPT shapes at random init (no download), against its physical floors.

    python bench/bench.py                                   # CPU: tiny and 125m shapes, seq 128, fp32
    python bench/bench.py --device cuda --sizes 1.3b 2.7b 6.7b 13b 30b      # GPU: fp16, batch 1, seq 2048
    python bench/bench.py --device cuda --sizes 66b 175b --depth 4          # cut in depth to fit the host
    python bench/bench.py --device cuda --sizes 6.7b --modes offloaded --budgets 6GB 9GB 12GB 15GB

Each (size, mode) runs in a fresh subprocess, so peak host RSS and device memory are its own. Reported:
median step after warm-up, first step, tokens/s, peak device memory (allocator, and "used" as NVML/
nvidia-smi report it, i.e. total - free), peak host RSS against the stored weights, bytes moved per
step (counted, beside the plan's), and the floors: bytes / measured pinned copy bandwidth, forward FLOPs / measured matmul rate, with the
ratio measured / floor. Modes: ``resident`` (plain MeZO), ``offloaded``, ``offloaded-skip`` (write-back
every ``--write-back-every`` steps); ``--budgets`` adds offloaded runs under a gpu_memory_budget and a
tokens/s-vs-budget plot. Writes results.json, results.md (and budget.png) under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from zo2 import ZOConfig, ZOEngine
from zo2.plan import OPT_SHAPES, Machine, make_plan, opt_config

MODES = ("resident", "offloaded", "offloaded-skip")


# ------------------------------------------------------------------------------- machine rates
def _timed(fn, repeats: int, device: str) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _copy_rates(size: int, device: str) -> dict:
    """Pinned H2D / D2H / both-at-once and pageable H2D copy rates and device memory bandwidth (GB/s) for
    ``size``-byte buffers, which are freed when this returns."""
    host_up, host_down = torch.empty(size, dtype=torch.uint8, pin_memory=True), torch.empty(size, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(size, dtype=torch.uint8)
    dev_a, dev_b = torch.empty(size, dtype=torch.uint8, device="cuda"), torch.empty(size, dtype=torch.uint8, device="cuda")
    up_stream, down_stream = torch.cuda.Stream(), torch.cuda.Stream()

    def both() -> None:
        with torch.cuda.stream(up_stream):
            dev_a.copy_(host_up, non_blocking=True)
        with torch.cuda.stream(down_stream):
            host_down.copy_(dev_b, non_blocking=True)
        up_stream.synchronize()
        down_stream.synchronize()

    return {"h2d_gbps": size / _timed(lambda: dev_a.copy_(host_up, non_blocking=True), 5, device) / 1e9,
            "d2h_gbps": size / _timed(lambda: host_down.copy_(dev_b, non_blocking=True), 5, device) / 1e9,
            "duplex_gbps": 2 * size / _timed(both, 5, device) / 1e9,
            "pageable_h2d_gbps": size / _timed(lambda: dev_a.copy_(pageable), 3, device) / 1e9,
            "memory_gbps": 2 * size / _timed(lambda: dev_a.copy_(dev_b), 5, device) / 1e9}  # read + write


def measure_machine(device: str) -> dict:
    """Pinned H2D / D2H / both-at-once copy bandwidth (GB/s), pageable H2D, and the matmul rate (TFLOP/s)."""
    if device != "cuda":
        size = 256 * 2**20
        src, dst = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
        copy = size / _timed(lambda: dst.copy_(src), 5, device) / 1e9
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        return {"h2d_gbps": copy, "d2h_gbps": copy, "duplex_gbps": copy, "pageable_h2d_gbps": copy,
                "matmul_tflops": 2 * n**3 / _timed(lambda: a @ b, 5, device) / 1e12, "matmul_dtype": "float32"}
    rates = _copy_rates(1 << 30, device)
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    rates["matmul_tflops"] = 2 * n**3 / _timed(lambda: a @ b, 10, device) / 1e12
    rates["matmul_dtype"] = "bfloat16"
    return rates


# ------------------------------------------------------------------------------------- one case
def build_model(size: str, dtype: torch.dtype, depth: int | None):
    """An OPT model of ``size`` with random weights, built without running HF's slow initialisers."""
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(opt_config(size, depth))
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()  # to_empty re-creates the parameters, which unties OPT's lm_head
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.03, 0.03)  # timing does not depend on the values; uniform_ is the fastest fill
    for module in model.modules():  # buffers (e.g. position ids) must be real values
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                module._buffers[key] = buffer.float()
    return model


def _config(mode: str, args: argparse.Namespace, budget: str | None) -> ZOConfig:
    return ZOConfig(zo2=mode != "resident", working_device=args.device, lr=1e-7, eps=1e-3,
                    write_back_every=args.write_back_every if mode == "offloaded-skip" else 1,
                    num_slots=args.num_slots, gpu_memory_budget=budget, perturbation_scope=args.perturbation_scope)


def _device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def run_case(size: str, mode: str, budget: str | None, args: argparse.Namespace, rates: dict) -> dict:
    """Build, place and time one configuration in this process."""
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    model = build_model(size, dtype, args.depth)
    config = _config(mode, args, budget)
    plan = make_plan(model, config, batch_size=args.batch, seq_len=args.seq,
                     machine=Machine(**{k: rates[k] for k in ("h2d_gbps", "d2h_gbps", "duplex_gbps", "matmul_tflops")},
                                     **({"memory_gbps": rates["memory_gbps"]} if "memory_gbps" in rates else {})))
    engine = ZOEngine(model, config)
    stored = sum(u.master.numel() * u.master.element_size() for u in engine.units)
    ids = torch.randint(2, 50000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, used, moved_before = [], 0, (0, 0)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            moved_before = engine.bytes_moved()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step(batch)
        if cuda:
            torch.cuda.synchronize()
            used = max(used, _device_used())
        times.append(time.perf_counter() - start)
    median = statistics.median(times[args.warmup:])
    floor = plan.step_floor_s
    return {"size": size, "mode": mode, "scope": engine.scope, "budget": budget, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
            "depth": args.depth or OPT_SHAPES[size][1], "params": sum(u.numel for u in engine.units),
            "resident_blocks": sum(not u.offloaded for u in engine.units) - 2, "median_step_s": median,
            "first_step_s": times[0], "tokens_per_s": args.batch * args.seq / median,
            "bytes_moved_per_step": (sum(engine.bytes_moved()) - sum(moved_before)) / args.steps,
            "predicted_bytes_moved_per_step": plan.upload_bytes + plan.download_bytes, "stored_weights_bytes": stored,
            "peak_cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_gpu_alloc_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_gpu_used_bytes": used if cuda else None, "transfer_floor_s": plan.transfer_floor_s,
            "compute_floor_s": plan.compute_floor_s, "noise_floor_s": plan.noise_floor_s, "floor_s": floor,
            "predicted_gpu_bytes": plan.working_weights_bytes + plan.activation_bytes,
            "measured_over_floor": median / floor if floor else None,
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"}


# ----------------------------------------------------------------------------------- reporting
def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| size | mode | resident blocks | median step (s) | first step (s) | tokens/s | floor (s) | measured/floor "
             "| moved/step (GB) | GPU alloc (MiB) | GPU used (MiB) | host RSS / weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = f"{r['mode']} ({r.get('scope', '?')} scope)" + (f" @ {r['budget']}" if r["budget"] else "")
        ratio = f"{r['measured_over_floor']:.2f}" if r["measured_over_floor"] else "-"
        lines.append(f"| {r['size']} (depth {r['depth']}) | {mode} | {r['resident_blocks']} | {r['median_step_s']:.3f} | "
                     f"{r['first_step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['floor_s']:.3f} | {ratio} | "
                     f"{r['bytes_moved_per_step'] / 1e9:.2f} | {_mib(r['peak_gpu_alloc_bytes'])} | "
                     f"{_mib(r['peak_gpu_used_bytes'])} | {r['peak_cpu_rss_bytes'] / r['stored_weights_bytes']:.2f} |")
    return "\n".join(lines)


def plot_budgets(rows: list[dict], path: Path) -> None:
    """tokens/s against the memory budget, one line per size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zo2.config import parse_bytes

    figure, axes = plt.subplots(figsize=(6, 4))
    for size in dict.fromkeys(r["size"] for r in rows if r["budget"]):
        points = sorted((parse_bytes(r["budget"]) / 1e9, r["tokens_per_s"]) for r in rows if r["size"] == size and r["budget"])
        axes.plot(*zip(*points), marker="o", label=f"OPT-{size}")
    axes.set_xlabel("gpu_memory_budget (GB)")
    axes.set_ylabel("tokens/s")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--sizes", nargs="+", default=["1.3b"] if cuda else ["tiny", "125m"], choices=list(OPT_SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--budgets", nargs="*", default=[], help="gpu_memory_budget values for extra offloaded runs")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="float16" if cuda else "float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048 if cuda else 128)
    parser.add_argument("--depth", type=int, default=None, help="cut every model to this many blocks")
    parser.add_argument("--write-back-every", type=int, default=4, help="k of the offloaded-skip mode")
    parser.add_argument("--num-slots", type=int, default=2)
    parser.add_argument("--perturbation-scope", default="auto", choices=["auto", "unit", "module"],
                        help="ZOConfig.perturbation_scope (auto: module when blocks stream, else unit)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--case", nargs=3, metavar=("SIZE", "MODE", "BUDGET"), help=argparse.SUPPRESS)
    parser.add_argument("--rates", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _forward_args(args: argparse.Namespace) -> list[str]:
    flags = ["--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq),
             "--write-back-every", str(args.write_back_every), "--num-slots", str(args.num_slots),
             "--perturbation-scope", args.perturbation_scope,
             "--warmup", str(args.warmup), "--steps", str(args.steps)]
    return flags + (["--depth", str(args.depth)] if args.depth else [])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case:  # child process: one configuration, result as JSON on the last line
        size, mode, budget = args.case
        print(json.dumps(run_case(size, mode, None if budget == "-" else budget, args, json.loads(args.rates))))
        return
    rates = measure_machine(args.device)
    print("machine:", json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in rates.items()}), flush=True)
    cases = [(size, mode, "-") for size in args.sizes for mode in args.modes]
    cases += [(size, "offloaded", budget) for size in args.sizes for budget in args.budgets]
    rows = []
    for size, mode, budget in cases:
        child = subprocess.run([sys.executable, __file__, "--case", size, mode, budget, "--rates", json.dumps(rates),
                                *_forward_args(args)], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{size} {mode} {budget}: failed\n{child.stderr[-2000:]}", flush=True)
            continue
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": rates, "rows": rows}, indent=2))
    (args.out / "results.md").write_text(markdown(rows) + "\n")
    if any(r["budget"] for r in rows):
        try:
            plot_budgets(rows, args.out / "budget.png")
        except ImportError:
            print("matplotlib is not installed: no budget.png (pip install matplotlib)")
    print(markdown(rows))


if __name__ == "__main__":
    main()
