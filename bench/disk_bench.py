"""Disk offload benchmark: the staging path beside dd and a plain sequential read of the same files,
and a model with 8x the bytes of a host-memory cap trained from disk.

    python bench/disk_bench.py --dir /nvme/zo2-bench                      # throughput on 2 GB of unit files
    python bench/disk_bench.py --dir /nvme/zo2-bench --train --cap 1GiB   # + the 8x-the-cap training run

Throughput: ``--size`` bytes of zo2 unit files (``--unit-mb`` each) are written by zo2's store, then read
back cold (every file's pages dropped first) five ways: ``dd iflag=direct``, ``dd`` through the page
cache, a plain Python sequential ``readinto`` of 64 MiB, and zo2's staging path (the real
:class:`zo2.offload.disk.staging.DiskTransferScheduler`: its I/O thread reading every unit ahead into the aligned
slots, double-buffered, the consumer taking them in order); writes: ``dd oflag=direct`` and zo2's
write-then-rename (with its fsyncs). Each is the median of ``--repeats``.

Training (``--train``): a LLaMA-shaped checkpoint of ``8 x --cap`` bytes (float32) is written shard by
shard from a meta-device model (never in memory), then a fresh process streams it to disk offload and
trains ``--steps`` steps; it reports its peak RSS (VmHWM) against the cap, the step times and the disk
traffic. JSON and markdown go to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from zo2.config import parse_bytes

_CHUNK = 64 << 20


def _drop_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed(fn, paths, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, each on cold files."""
    times = []
    for _ in range(repeats):
        _drop_cache(paths)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _dd(paths, *flags: str) -> None:
    for path in paths:
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=64M", *flags], check=True, capture_output=True)


def _plain_read(paths) -> None:
    buffer = bytearray(_CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def _units_and_store(folder: Path, size: int, unit_bytes: int, direct: bool | None):
    """zo2 unit files of ``size`` bytes in ``folder``, written by zo2's store; (units, store, log)."""
    from zo2.offload.disk.aligned import aligned_empty
    from zo2.offload.disk.store import MASTER, DiskStore, StoredBuffer, placeholder
    from zo2.units.storage import Unit
    from zo2.updates.log import UpdateLog

    count, numel = max(1, size // unit_bytes), unit_bytes // 4
    buffers = [StoredBuffer(i, MASTER, f"block.{i}", torch.float32, numel) for i in range(count)]
    store = DiskStore(folder, buffers, {"bench": True}, updates_per_step=1, direct=direct)
    data = aligned_empty(unit_bytes)
    data.view(torch.float32)[:numel].normal_()
    for buffer in buffers:
        store.write(buffer.unit, data, applied=0)
    units = [Unit(index=i, name=f"block.{i}", params=[], master=placeholder(numel, torch.float32), offloaded=True,
                  n_decay=0) for i in range(count)]
    return units, store, UpdateLog(1)


def _staging_path(folder: Path, args, direct: bool | None) -> tuple[list[Path], dict, dict]:
    """Read and write rates (median seconds) of zo2's own path on fresh unit files in ``folder``."""
    from zo2.offload.disk.staging import DiskTransferScheduler

    units, store, log = _units_and_store(folder, parse_bytes(args.size), args.unit_mb << 20, direct)
    paths = [store.path(u.index) for u in units]
    scheduler = DiskTransferScheduler(units, store, log, 2, torch.device("cpu"))

    def reads() -> None:  # the walk's order with nothing computed: disk-bound
        scheduler.restart()
        for unit in units:
            scheduler.acquire(unit)
            scheduler.release(unit)
        scheduler.reset()

    mode = "O_DIRECT" if store.direct else "buffered + DONTNEED"
    read = {f"zo2 staging path ({mode}; reader thread, 2 slots)": _timed(reads, paths, args.repeats)}
    slot = scheduler.pool.buffers[0]  # a write-back writes from a slot
    write = {f"zo2 write-back ({mode}; temporary file, fdatasync, rename)":
             _timed(lambda: [store.write(u.index, slot, applied=0) for u in units], paths, args.repeats)}
    scheduler.close()
    store.close()
    return paths, read, write


def throughput(args) -> dict:
    if args.unit_mb % 64:
        raise SystemExit("--unit-mb must be a multiple of 64 (dd copies 64 MiB blocks)")
    folder = Path(tempfile.mkdtemp(prefix="zo2-bench-", dir=args.dir))
    paths, reads, writes = _staging_path(folder, args, direct=None)
    if "O_DIRECT" in next(iter(reads)):
        _, buffered_reads, buffered_writes = _staging_path(folder, args, direct=False)
        reads.update(buffered_reads)
        writes.update(buffered_writes)
    reads.update({
        "dd iflag=direct bs=64M": _timed(lambda: _dd(paths, "iflag=direct"), paths, args.repeats),
        "dd bs=64M (page cache, dropped before)": _timed(lambda: _dd(paths), paths, args.repeats),
        "python readinto 64 MiB (page cache, dropped before)": _timed(lambda: _plain_read(paths), paths, args.repeats),
    })
    scratch = folder / "dd-write"
    dd_write = ["dd", "if=/dev/zero", f"of={scratch}", "bs=64M", f"count={args.unit_mb // 64}", "oflag=direct",
                "conv=fsync"]
    writes["dd oflag=direct conv=fsync bs=64M"] = _timed(
        lambda: [subprocess.run(dd_write, check=True, capture_output=True) for _ in paths], paths, args.repeats)
    data = len(paths) * (args.unit_mb << 20)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    return {"files": len(paths), "bytes": data, "unit_mb": args.unit_mb,
            "read_gbps": {k: data / v / 1e9 for k, v in reads.items()},
            "write_gbps": {k: data / v / 1e9 for k, v in writes.items()}}


# ------------------------------------------------------------------------------------- training
def _llama_config(target_bytes: int, hidden: int, inter: int):
    from transformers import LlamaConfig

    block = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round(target_bytes / 4 / block))
    return LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def write_checkpoint(folder: Path, config) -> int:
    """A random-init checkpoint of ``config`` written one block per shard from a meta-device model."""
    from transformers import AutoModelForCausalLM

    from zo2.persist.shards import INDEX_NAME, write_shard

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        group = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(group, {})[name] = param
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for number, (group, params) in enumerate(groups.items(), start=1):
        tensors = {name: (torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=generator) * 0.02)
                   for name, p in params.items()}
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        total += write_shard(folder / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    return total


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def train_worker(args) -> None:
    """(Child process) stream the checkpoint to disk offload, train, print one JSON line."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    from zo2 import ZOConfig
    from zo2.loading import from_pretrained

    config = ZOConfig(working_device="cpu", lr=1e-6, eps=1e-3, offloading_device="disk", offload_dir=args.offload,
                      noise=args.noise, write_back_every=args.write_back_every, perturbation_scope=args.scope,
                      offload_io=args.offload_io)
    start = time.perf_counter()
    engine = from_pretrained(args.checkpoint, config)
    load_s, peaks = time.perf_counter() - start, {"load": _peak_rss()}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times, read0, written0 = [], engine.store.bytes_read, engine.store.bytes_written
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step(batch)
        times.append(time.perf_counter() - start)
        peaks[f"step {len(times)}"] = _peak_rss()
    engine.flush()
    peaks["flush"] = _peak_rss()
    print(json.dumps({"load_s": load_s, "step_s": times, "peak_rss": peaks["flush"], "peak_rss_after": peaks,
                      "staging_bytes": engine.residency.scheduler.held_bytes,
                      "disk_read_per_step": (engine.store.bytes_read - read0) / (args.steps + 1),
                      "disk_written": engine.store.bytes_written - written0,
                      "resident_bytes": sum(u.master.nbytes for u in engine.units if not u.offloaded)}))


def train(args) -> dict:
    cap = parse_bytes(args.cap)
    folder = Path(tempfile.mkdtemp(prefix="zo2-train-", dir=args.dir))
    config = _llama_config(8 * cap, args.hidden, args.inter)
    model_bytes = write_checkpoint(folder / "checkpoint", config)
    (folder / "offload").mkdir()
    command = [sys.executable, __file__, "--worker", "--checkpoint", str(folder / "checkpoint"), "--offload",
               str(folder / "offload"), "--steps", str(args.steps), "--noise", args.noise, "--scope", args.scope,
               "--write-back-every", str(args.write_back_every), "--batch", str(args.batch), "--seq", str(args.seq),
               "--offload-io", args.offload_io]
    env = {**os.environ, "ZO2_COMPILE_NOISE": "0"}  # compiling the noise generator costs ~100 MB of RSS
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"training run failed ({run.returncode}): {run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()
    return {**result, "cap": cap, "model_bytes": model_bytes, "layers": config.num_hidden_layers,
            "hidden": args.hidden, "offload_io": args.offload_io, "threads": torch.get_num_threads(),
            "under_cap": result["peak_rss"] < cap}


def _markdown(result: dict) -> str:
    lines = []
    if "throughput" in result:
        t = result["throughput"]
        lines += [f"Read, {t['files']} files x {t['unit_mb']} MiB ({t['bytes'] / 1e9:.2f} GB), cold:", "",
                  "| reader | GB/s | vs dd iflag=direct | vs the fastest plain reader |", "|---|---|---|---|"]
        direct = t["read_gbps"]["dd iflag=direct bs=64M"]
        plain = max(v for k, v in t["read_gbps"].items() if not k.startswith("zo2"))
        lines += [f"| {k} | {v:.2f} | {v / direct:.0%} | {v / plain:.0%} |" for k, v in t["read_gbps"].items()]
        lines += ["", "| writer | GB/s |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in t["write_gbps"].items()]
    if "train" in result:
        r = result["train"]
        lines += ["", f"Training from disk: {r['model_bytes'] / 1e9:.2f} GB model ({r['layers']} blocks), cap "
                  f"{r['cap'] / 2**30:.2f} GiB: peak RSS "
                  f"{r['peak_rss'] / 2**30:.2f} GiB, staging {r['staging_bytes'] / 2**20:.0f} MiB, load "
                  f"{r['load_s']:.0f} s, median step {statistics.median(r['step_s']):.1f} s, disk read "
                  f"{r['disk_read_per_step'] / 1e9:.2f} GB/step"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=".", help="a folder on the disk to measure (default: here)")
    parser.add_argument("--size", default="2GB", help="bytes of unit files for the throughput test")
    parser.add_argument("--unit-mb", type=int, default=256, help="MiB per unit file (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="also train a model 8x --cap from disk")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--cap", default="1GiB", help="host-memory cap of the training run")
    parser.add_argument("--offload-io", default="auto", choices=["auto", "direct", "buffered"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--noise", default="rademacher")
    parser.add_argument("--scope", default="unit")
    parser.add_argument("--write-back-every", type=int, default=1)
    parser.add_argument("--out", default="bench/results/disk")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--offload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train_worker(args)
        return
    result = {}
    if not args.no_throughput:
        result["throughput"] = throughput(args)
    if args.train:
        result["train"] = train(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "disk_bench.json").write_text(json.dumps(result, indent=2))
    (out / "disk_bench.md").write_text(_markdown(result) + "\n")
    print(_markdown(result))


if __name__ == "__main__":
    main()
