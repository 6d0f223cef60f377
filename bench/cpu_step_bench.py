"""CPU side by side: what a zeroth-order step costs beside its forward pass (one process per configuration).

    python bench/cpu_step_bench.py                       # SmolLM2-135M fp32, batch 16 x 64, 2 rounds
    python bench/cpu_step_bench.py --rounds 3 --configs floor zo2-resident --json out.json

Configurations, on the same model (the embedded SmolLM2-135M, converted once and cached) and batch:

* ``floor``: one no_grad forward of the doubled batch (both halves of a zo2 step) and the per-half
  causal-LM losses, with no noise at all: what a step cannot go below;
* ``mezo``: MeZO's reference step as the paper describes it (Malladi et al., arXiv 2305.17333,
  Algorithm 1): z drawn per parameter with ``torch.normal`` from a generator reset to the step's seed,
  four passes over the weights (perturb +eps, -2eps, restore +eps, update) around two forwards;
* ``zo2-resident`` / ``zo2-offloaded``: ``ZOEngine.step`` with every block resident, or every block
  offloaded (the CPU as the working device: blocks pass through slots by host copies).

Each configuration runs in its own process (no allocator or thread-pool state shared), ``--rounds`` times,
interleaved; the table shows the median step of ``--steps`` after ``--warmup`` warm-up steps, the first
step, and the ratios to the floor and to MeZO's reference. The load average is printed before and after
(the benchmark is only comparable within one run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = ("floor", "mezo", "zo2-resident", "zo2-offloaded")


def _batch(vocab_size: int, batch_size: int, length: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def _floor_step(model, batch):
    import torch

    from zo2.objectives.task_loss import causal_lm_loss

    doubled = {k: torch.cat([v, v]) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**doubled, use_cache=False).logits
        halves = logits.chunk(2)
        return [causal_lm_loss(half, batch["labels"]).item() for half in halves]


def _mezo_step(model, batch, seed: int, lr: float = 1e-6, eps: float = 1e-3) -> float:
    """MeZO-SGD, Algorithm 1 of arXiv 2305.17333: z regenerated from the seed for every pass."""
    import torch

    from zo2.objectives.task_loss import causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]

    def perturb(scale: float) -> None:
        generator = torch.Generator().manual_seed(seed)
        for param in params:
            z = torch.normal(0.0, 1.0, size=param.shape, generator=generator, dtype=param.dtype)
            param.data.add_(z, alpha=scale)

    def loss() -> float:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return causal_lm_loss(model(**inputs, use_cache=False).logits, batch["labels"]).item()

    with torch.no_grad():
        perturb(eps)
        loss_plus = loss()
        perturb(-2 * eps)
        loss_minus = loss()
        perturb(eps)
        grad = (loss_plus - loss_minus) / (2 * eps)
        perturb(-lr * grad)  # theta <- theta - lr * g * z: the same z, regenerated
    return grad


def _run_one(config: str, args: argparse.Namespace) -> dict:
    """One configuration in this process: step times in seconds."""
    import torch

    from zo2 import ZOConfig, ZOEngine
    from zo2.cli.finetune import load_embedded_model

    _, model = load_embedded_model(torch.float32)
    model.eval()
    batch = _batch(model.config.vocab_size, args.batch_size, args.length)
    built = time.perf_counter()
    if config == "floor":
        step = lambda t: _floor_step(model, batch)
    elif config == "mezo":
        step = lambda t: _mezo_step(model, batch, seed=t)
    else:
        engine = ZOEngine(model, ZOConfig(working_device="cpu", zo2=config == "zo2-offloaded", lr=1e-6, eps=1e-3,
                                          kernels=args.kernels))
        step = lambda t: engine.step(batch)
    setup = time.perf_counter() - built
    times, cpu = [], []
    for t in range(args.warmup + args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(t)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"config": config, "setup_s": setup, "first_s": times[0], "median_s": statistics.median(times[args.warmup:]),
            "cpu_s": statistics.median(cpu[args.warmup:]), "steps_s": times, "threads": torch.get_num_threads()}


def _table(rows: list[dict], rounds: int) -> str:
    """Wall s/step per round; the medians over rounds give the ratios. CPU s/step (process time, all
    threads) does not count time the machine gave to other processes: the robust figure on a shared host."""
    by_config = {c: [r for r in rows if r["config"] == c] for c in CONFIGS if any(r["config"] == c for r in rows)}
    wall = {c: statistics.median(r["median_s"] for r in rs) for c, rs in by_config.items()}
    cpu = {c: statistics.median(r["cpu_s"] for r in rs) for c, rs in by_config.items()}
    lines = ["| configuration | " + " | ".join(f"s/step, round {i + 1}" for i in range(rounds))
             + " | first step (s) | CPU s/step | x floor | x floor (CPU) | mezo / this |", "|---" * (rounds + 6) + "|"]
    for config, rs in by_config.items():
        ratios = [f"{wall[config] / wall['floor']:.2f}" if "floor" in wall else "-",
                  f"{cpu[config] / cpu['floor']:.2f}" if "floor" in cpu else "-",
                  f"{wall['mezo'] / wall[config]:.2f}" if "mezo" in wall else "-"]
        cells = " | ".join(f"{r['median_s']:.2f}" for r in rs)
        first = statistics.median(r["first_s"] for r in rs)
        lines.append(f"| {config} | {cells} | {first:.2f} | {cpu[config]:.2f} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kernels", default="auto", help="ZOConfig.kernels of the zo2 configurations")
    parser.add_argument("--json", help="also write every round's measurements here")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_run_one(args.one, args)))
        return
    load_before = os.getloadavg()
    rows = []
    child = [sys.executable, __file__, "--batch-size", str(args.batch_size), "--length", str(args.length),
             "--warmup", str(args.warmup), "--steps", str(args.steps), "--kernels", args.kernels]
    for round_ in range(args.rounds):
        for config in args.configs:
            out = subprocess.run([*child, "--one", config], check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {config}: median {rows[-1]['median_s']:.2f} s, first {rows[-1]['first_s']:.2f} s",
                  file=sys.stderr)
    print(f"SmolLM2-135M fp32, batch {args.batch_size} x {args.length} tokens, median of {args.steps} steps after "
          f"{args.warmup} warm-up steps, {rows[0]['threads']} threads; load average before "
          f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(_table(rows, args.rounds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
