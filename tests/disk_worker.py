"""A disk-offloaded training process for tests that kill it, limit it or measure it.

    python disk_worker.py CHECKPOINT OFFLOAD_DIR STEPS OUT [--kill-at data|rename|journal --kill-step K]
                          [--fsize-limit BYTES --limit-after-step K] [--rss] [--scope unit|module]
                          [--noise gaussian|rademacher] [--write-back-every K]

Streams CHECKPOINT with ``zo2.loading.from_pretrained(..., resume=True)``, trains until the engine has
STEPS steps (step s on ``make_batch(seed=s)``) and saves the flushed weights to OUT. ``--kill-at``
sends this process SIGKILL in the middle of a write-back once the engine is at step K: half-way
through writing a master's data, just before the rename that publishes it, or right after the journal
was appended and before the master file is written. ``--fsize-limit`` sets RLIMIT_FSIZE (a real
file-size limit: writes beyond it fail with EFBIG) after step K. ``--rss`` prints the RSS once torch,
transformers and the model's code are imported, the peak RSS, and the bytes of the staging buffers.
"""
import argparse
import os
import resource
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from tiny import make_batch  # noqa: E402

from zo2 import ZOConfig
from zo2.loading import from_pretrained, unit_weights  # noqa: E402
from zo2.offload.disk import journal  # noqa: E402
from zo2.offload.disk.store import HEADER_BYTES, DiskOffloadError  # noqa: E402

progress = {"step": 0}


def _kill_when(point: str, step: int) -> None:
    """Patch the I/O the store does so that this process dies by SIGKILL at ``point`` of a write-back."""
    def due(path: str) -> bool:
        return progress["step"] >= step and os.path.basename(path).startswith("unit-")

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "data":
        original = os.pwritev

        def pwritev(fd, views, offset):
            if due(os.readlink(f"/proc/self/fd/{fd}")) and offset == HEADER_BYTES:  # the data, then the header
                half = len(views[0]) // 2 // 4096 * 4096  # O_DIRECT writes whole 4 KiB blocks
                original(fd, [views[0][:half]], offset)  # half the data
                die()
            return original(fd, views, offset)
        os.pwritev = pwritev
    elif point == "rename":
        original_replace = os.replace

        def replace(src, dst):
            if str(src).endswith(".tmp") and due(str(src)):
                die()
            return original_replace(src, dst)
        os.replace = replace
    else:
        original_extend = journal.Journal.extend

        def extend(self, steps):
            original_extend(self, steps)
            if steps and progress["step"] >= step:
                die()
        journal.Journal.extend = extend


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("checkpoint", "offload", "out"):
        parser.add_argument(name)
    parser.add_argument("steps", type=int)
    parser.add_argument("--kill-at", choices=["data", "rename", "journal"])
    parser.add_argument("--kill-step", type=int, default=0)
    parser.add_argument("--fsize-limit", type=int)
    parser.add_argument("--limit-after-step", type=int, default=-1, help="-1: from the start")
    parser.add_argument("--write-back-every", type=int, default=2)
    parser.add_argument("--scope", default="unit")
    parser.add_argument("--noise", default="gaussian")
    parser.add_argument("--rss", action="store_true")
    args = parser.parse_args()
    import transformers.models.llama.modeling_llama  # noqa: F401  the model's code: part of the baseline
    start = _rss_mib("VmRSS:")
    if args.kill_at:
        _kill_when(args.kill_at, args.kill_step)
    config = ZOConfig(working_device="cpu", lr=1e-2, eps=1e-3, weight_decay=0.1, offloading_device="disk",
                      offload_dir=args.offload, write_back_every=args.write_back_every, perturbation_scope=args.scope,
                      noise=args.noise)
    try:
        if args.fsize_limit and args.limit_after_step < 0:
            _limit_file_size(args.fsize_limit)
        engine = from_pretrained(args.checkpoint, config, resume=True)
        print("resumed at", engine.step_count, flush=True)
        while engine.step_count < args.steps:
            if args.fsize_limit and engine.step_count == args.limit_after_step:
                _limit_file_size(args.fsize_limit)
            progress["step"] = engine.step_count
            engine.step(make_batch(seed=engine.step_count))
        engine.flush()
    except DiskOffloadError as err:
        print("ERROR", err, flush=True)
        return
    if args.rss:
        print("RSS", start, _rss_mib("VmHWM:"), engine.residency.scheduler.held_bytes, flush=True)
    torch.save(torch.cat([unit_weights(engine, unit).reshape(-1) for unit in engine.units]), args.out)


if __name__ == "__main__":
    main()
