"""Step-time benchmark of zo2 on OPT shapes at random init (no download).

    python bench/bench.py                              # CPU: tiny and 125m shapes, resident vs offloaded
    python bench/bench.py --sizes 1.3b 6.7b --device cuda --dtype float16 --seq 2048

For every (size, mode) it reports the median step time after warm-up, tokens/s, peak CPU RSS, peak
GPU memory (allocator) on CUDA, and the bytes moved per step between the offloading and the working
device. Writes JSON and a markdown table (``--out``). Large shapes can be cut in depth (``--depth``).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM

from zo2 import ZOConfig, ZOEngine

#: OPT shapes: hidden size, layers, heads (ffn = 4 x hidden).
OPT_SHAPES = {"tiny": (64, 4, 4), "125m": (768, 12, 12), "350m": (1024, 24, 16), "1.3b": (2048, 24, 32),
              "2.7b": (2560, 32, 32), "6.7b": (4096, 32, 32), "13b": (5120, 40, 40), "30b": (7168, 48, 56),
              "66b": (9216, 64, 72), "175b": (12288, 96, 96)}


def build_model(size: str, dtype: torch.dtype, depth: int | None) -> OPTForCausalLM:
    """An OPT model of ``size`` with random weights, built without running HF's slow initialisers."""
    hidden, layers, heads = OPT_SHAPES[size]
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=depth or layers, num_attention_heads=heads,
                       ffn_dim=4 * hidden, word_embed_proj_dim=hidden, vocab_size=50272, max_position_embeddings=2048)
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()  # to_empty re-creates the parameters, which unties OPT's lm_head
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    for module in model.modules():  # buffers (e.g. position ids) must be real values
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                module._buffers[key] = buffer.float()
    return model


def run_case(size: str, offloaded: bool, args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    model = build_model(size, dtype, args.depth)
    config = ZOConfig(zo2=offloaded, working_device=args.device, lr=1e-7, eps=1e-3)
    engine = ZOEngine(model, config)
    ids = torch.randint(2, 50000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step(batch)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    moved = sum(u.master.numel() * u.master.element_size() for u in engine.units if u.offloaded) * 2
    return {"size": size, "mode": "offloaded" if offloaded else "resident", "dtype": args.dtype,
            "batch": args.batch, "seq": args.seq, "depth": args.depth or OPT_SHAPES[size][1],
            "params": sum(u.numel for u in engine.units), "median_step_s": median,
            "tokens_per_s": args.batch * args.seq / median, "bytes_moved_per_step": moved,
            "peak_cpu_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_alloc_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"}


def markdown(rows: list[dict]) -> str:
    lines = ["| size | mode | params | median step (s) | tokens/s | moved/step (MiB) | peak RSS (MiB) | peak GPU (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gpu = f"{r['peak_gpu_alloc_mib']:.0f}" if r["peak_gpu_alloc_mib"] is not None else "-"
        lines.append(f"| {r['size']} | {r['mode']} | {r['params'] / 1e6:.1f}M | {r['median_step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['bytes_moved_per_step'] / 2**20:.0f} | "
                     f"{r['peak_cpu_rss_mib']:.0f} | {gpu} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "125m"], choices=sorted(OPT_SHAPES))
    parser.add_argument("--modes", nargs="+", default=["resident", "offloaded"], choices=["resident", "offloaded"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128, help="sequence length (2048 for the paper's setting)")
    parser.add_argument("--depth", type=int, default=None, help="cut the model to this many blocks")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        for mode in args.modes:
            rows.append(run_case(size, mode == "offloaded", args))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
