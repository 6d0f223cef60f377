"""Real multi-process jobs for tests/test_distributed.py.

``launch`` starts N processes the way torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in the environment; gloo on the CPU) and collects what each returns. Processes are forked
from a forkserver that imported torch, transformers and zo2 once, so a job starts in well under a
second; every wait has a deadline, so a bug fails the test instead of hanging it.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import runpy
import signal
import socket
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine
from zo2.distributed import DistributedError, restore_checkpoint, role_for, save_checkpoint, shard_batch
from zo2.tuning import search_lr

#: Tiny LLaMA whose blocks hold an odd number of elements (2235), so sliced transfers have a tail.
MODEL = dict(hidden_size=15, head_dim=6, num_attention_heads=3, num_key_value_heads=1, intermediate_size=33)
BATCH = dict(batch=4, length=8)
TRAINING = dict(working_device="cpu", lr=1e-2, eps=1e-3, weight_decay=0.1)

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["torch", "transformers", "transformers.models.llama.modeling_llama", "zo2",
                                 "zo2.distributed", "dist_worker"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(job: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N processes share 2 cores
    try:
        outcome = ("ok", job(*args))
    except BaseException as err:  # reported to the test, which decides whether it was expected
        outcome = ("error", (type(err).__name__, str(err), traceback.format_exc()))
    results.put(pickle.dumps((rank, outcome)))  # by value: no shared-memory handles to a dying process
    results.close()
    results.join_thread()
    os._exit(0)  # skip tearing down a process group whose peer may be dead (that can block)


def launch(job: Callable, world_size: int, *args: Any, wait_for: set[int] | None = None,
           timeout: float = 60.0) -> dict[int, tuple[str, Any]]:
    """Run ``job(*args)`` on ``world_size`` ranks; return {rank: ("ok", result) | ("error", (type, msg, tb))}.

    Waits until the ranks in ``wait_for`` (default: all) have reported, every process has ended, or
    ``timeout`` seconds have passed; processes still running then are killed."""
    wait_for = set(range(world_size)) if wait_for is None else wait_for
    port, results = _free_port(), _context.Queue()
    processes = [_context.Process(target=_entry, args=(job, rank, world_size, port, args, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while not wait_for <= outcomes.keys() and time.monotonic() < deadline:
        try:
            rank, outcome = pickle.loads(results.get(timeout=0.2))
            outcomes[rank] = outcome
        except queue.Empty:
            if not any(p.is_alive() for p in processes) and results.empty():
                break
    for rank, process in enumerate(processes):
        if rank in outcomes:  # reported: it exits right away
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
    return outcomes


def results_of(outcomes: dict[int, tuple[str, Any]], world_size: int) -> list[Any]:
    """Every rank's result; fails with the worker's traceback if a rank raised or never reported."""
    for rank in range(world_size):
        status, value = outcomes.get(rank, ("missing", None))
        assert status == "ok", f"rank {rank}: {status}\n{value[2] if value else 'no report (died or timed out)'}"
    return [outcomes[rank][1] for rank in range(world_size)]


# ------------------------------------------------------------------------------------- jobs
def train(config: ZOConfig, steps: int, *, role=None, batch: dict | None = None) -> ZOEngine:
    """``steps`` steps on the tiny model; under a process group ``batch`` is this rank's shard."""
    engine = ZOEngine(make_model("llama", dtype=torch.float64, **MODEL), config, role=role)
    batch = make_batch(**BATCH) if batch is None else batch
    for _ in range(steps):
        engine.step(batch)
    return engine


def summary(engine: ZOEngine) -> dict:
    """Weights (flushed) and the update history."""
    return {"masters": masters(engine), "history": [(u.seed, u.projected_grad, u.lr) for u in engine.history]}


def train_scenarios(scenarios: dict[str, dict]) -> dict[str, dict]:
    """Each scenario: {"config": ZOConfig kwargs, "steps": n, "save": directory or None}."""
    out = {}
    for name, spec in scenarios.items():
        config = ZOConfig(**TRAINING, **spec["config"])
        role = role_for(config)
        engine = train(config, spec["steps"], role=role, batch=shard_batch(make_batch(**BATCH), config))
        if spec.get("save"):
            save_checkpoint(engine, spec["save"])
        out[name] = summary(engine)
        if config.sliced_transfers:
            out[name]["shared"] = _other_rank_sees_writes(engine.units[1])
    return out


def search_and_train(config: dict, steps: int) -> dict:
    """lr="auto" on this rank's shard (data parallel by default): the pick, the search's scores, then
    ``steps`` steps at the pick (``summary``)."""
    config = ZOConfig(**{**TRAINING, "lr": "auto", "weight_decay": 0.0}, **config)
    role = role_for(config)
    engine = ZOEngine(make_model("llama", dtype=torch.float64, **MODEL), config, role=role)
    batch = shard_batch(make_batch(**BATCH), config)  # validated on the batch it trains on: the pick is inner
    result = search_lr(engine, lambda step: batch, [batch], steps=2, factors=(10.0, 100.0, 1000.0, 10000.0))
    for _ in range(steps):
        engine.step(batch)
    return {"lr": engine.lr, "scores": [row["score"] for row in result.table], **summary(engine)}


def _other_rank_sees_writes(unit) -> bool:
    """Rank 0 writes a marker into the shared master; does rank 1 read it? (Then rank 0 restores it.)"""
    original = unit.master[-1].item()
    dist.barrier()
    if dist.get_rank() == 0:
        unit.master[-1] = 12345.0
    dist.barrier()
    seen = unit.master[-1].item() == 12345.0
    dist.barrier()
    if dist.get_rank() == 0:
        unit.master[-1] = original
    dist.barrier()
    return seen


def check_config_job(seed_of_rank: list[int]) -> str:
    """role_for with a different seed per rank; returns the error it raised."""
    config = ZOConfig(**TRAINING, seed=seed_of_rank[int(os.environ["RANK"])])
    try:
        role_for(config)
    except DistributedError as err:
        return str(err)
    return "no error"


def lose_a_rank(how: str, timeout: float) -> str:
    """Both ranks train; after one step rank 1 is killed (SIGKILL) or hangs; rank 0 keeps stepping."""
    config = ZOConfig(**TRAINING, distributed_timeout=timeout)
    role = role_for(config)
    engine = train(config, 1, role=role, batch=shard_batch(make_batch(**BATCH), config))
    if dist.get_rank() == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10 * timeout)
    try:
        for _ in range(3):
            engine.step(shard_batch(make_batch(**BATCH), config))
    except DistributedError as err:
        return str(err)
    return "no error"


def run_script(path: str, argv: list[str]) -> None:
    """Run a script as ``__main__`` with ``argv``, as a launcher would in each process."""
    sys.argv = [path, *argv]
    runpy.run_path(path, run_name="__main__")


def resume_in_one_process(directory: str, steps: int) -> dict:
    """Load a checkpoint saved by a distributed run and train ``steps`` more steps with the full batch."""
    config = ZOConfig(**TRAINING)
    engine = ZOEngine(make_model("llama", dtype=torch.float64, **MODEL), config)
    restore_checkpoint(engine, directory)
    for _ in range(steps):
        engine.step(make_batch(**BATCH))
    return summary(engine)
