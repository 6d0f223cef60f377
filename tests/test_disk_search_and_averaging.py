"""lr="auto" and iterate averaging on disk-offloaded engines: the offload folder is the run's durable state, so
the search returns its files and journal to the start exactly, averaging puts the last iterate back, and a
process killed at any point of either leaves a folder that reopens (``resume=True``) at the run's own state:
the start, or the last iterate, never candidate or averaged weights taken for training. Real files in
tmp_path; crashes are real SIGKILLed subprocesses."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine
from zo2.loading import from_pretrained, unit_weights
from zo2.offload.disk.folder import clear_folder, foreign_files
from zo2.plan import block_locations, host_bytes, model_sizes, walk_shape
from zo2.tuning import LRSearchInterrupted, average_iterates, averaged, search_lr

TRAIN = [make_batch(batch=4, length=8, seed=s) for s in range(3)]
VALIDATION = [make_batch(batch=4, length=8, seed=10 + s) for s in range(2)]
FACTORS = (0.3, 1.0, 30.0)


def _batches(step: int) -> dict:
    return TRAIN[step % len(TRAIN)]


def _config(lr, folder=None, **extra) -> ZOConfig:
    disk = {"offloading_device": "disk", "offload_dir": str(folder)} if folder is not None else {}
    return ZOConfig(working_device="cpu", seed=3, lr=lr, eps=1e-3, **disk, **extra)


def weights(engine: ZOEngine) -> torch.Tensor:
    """Every unit's flushed master (read from its file for a disk unit), concatenated."""
    engine.flush()
    return torch.cat([unit_weights(engine, unit).reshape(-1) for unit in engine.units])


def _train(engine: ZOEngine, steps: int = 3, lr: float | None = None) -> torch.Tensor:
    for _ in range(steps):
        engine.step(_batches(engine.step_count), lr)
    return weights(engine)


def _at_the_start(engine: ZOEngine, start: torch.Tensor) -> None:
    """The engine and its folder are exactly the start: weights, step 0, a header-only journal, every file at
    step 0, and nothing kept."""
    folder = engine.store.directory
    assert weights(engine).equal(start) and engine.step_count == 0
    assert len((folder / "journal.jsonl").read_bytes().splitlines()) == 1
    assert all(engine.store.applied(u.index) == 0 for u in engine.units if engine.store.holds(u))
    assert not (folder / "kept.json").exists() and not (folder / "kept").exists()


# ------------------------------------------------------------------------------------- lr search
@pytest.mark.parametrize("links", [True, False])
def test_a_search_on_disk_returns_to_the_start_and_trains_as_the_pick_on_disk_and_in_cpu_memory(tmp_path, links,
                                                                                              monkeypatch):
    if not links:  # a filesystem without hard links: the kept files are copies
        def no_links(source, target):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
    engine = ZOEngine(make_model("llama"), _config("auto", tmp_path / "search"))
    assert all(engine.store.holds(u) for u in engine.units[1:-1])
    start = weights(engine)
    result = search_lr(engine, _batches, VALIDATION, steps=2, factors=FACTORS)
    _at_the_start(engine, start)
    searched = _train(engine)
    direct = ZOEngine(make_model("llama"), _config(result.lr, tmp_path / "direct"))
    on_host = ZOEngine(make_model("llama"), _config(result.lr, zo2=True))  # blocks offloaded to CPU memory
    assert not searched.equal(start)
    assert searched.equal(_train(direct)) and searched.equal(_train(on_host))
    # the journal holds the training steps from step 0, as the direct run's does: a resume replays them
    assert (tmp_path / "search" / "journal.jsonl").read_bytes() == (tmp_path / "direct" / "journal.jsonl").read_bytes()


def test_a_search_on_a_mixed_engine_restores_the_host_and_disk_blocks(tmp_path):
    """host_memory_budget keeps the first two blocks in host memory, the last two on disk."""
    folder = tmp_path / "mixed"
    probe = _config("auto", folder)
    split = ["host", "host", "disk", "disk"]
    sizes = model_sizes(make_model("llama", num_hidden_layers=4))
    budget = host_bytes(sizes, split, probe, "unit", walk_shape(probe).perturbed_per_walk, accelerator=False)
    config = _config("auto", folder, host_memory_budget=budget)
    assert block_locations(config, sizes, accelerator=False) == split
    engine = ZOEngine(make_model("llama", num_hidden_layers=4), config)
    assert [engine.store.holds(u) for u in engine.units] == [False, False, False, True, True, False]
    start = weights(engine)
    result = search_lr(engine, _batches, VALIDATION, steps=2, factors=FACTORS)
    _at_the_start(engine, start)
    direct = ZOEngine(make_model("llama", num_hidden_layers=4), _config(result.lr, zo2=False))
    searched = _train(engine)
    assert not searched.equal(start) and searched.equal(_train(direct))


def test_a_stop_request_during_a_disk_search_restores_the_start(tmp_path):
    engine = ZOEngine(make_model("llama"), _config("auto", tmp_path))
    start, calls = weights(engine), []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3  # inside the second candidate, after the first was restored
    with pytest.raises(LRSearchInterrupted):
        search_lr(engine, _batches, VALIDATION, steps=2, factors=FACTORS, should_stop=stop)
    _at_the_start(engine, start)
    assert engine.lr is None


# -------------------------------------------------------------------------------------- averaging
def _averaging_engine(folder=None, steps: int = 4) -> ZOEngine:
    engine = ZOEngine(make_model("llama"), _config(1e-3, folder, zo2=True))
    _train(engine, steps)
    return engine


def test_averaging_on_disk_equals_averaging_in_cpu_memory_and_the_last_iterate_comes_back(tmp_path):
    on_disk, on_host = _averaging_engine(tmp_path / "disk"), _averaging_engine()
    last = weights(on_disk)
    assert last.equal(masters(on_host))
    with pytest.raises(ValueError, match="averaged\\(engine, last\\)"):
        average_iterates(on_disk, 0.5)
    with averaged(on_disk, 0.5) as k:
        assert k == 2 and (tmp_path / "disk" / "kept.json").exists()
        mean = weights(on_disk)
    average_iterates(on_host, 0.5)
    assert mean.equal(masters(on_host)) and not mean.equal(last)
    assert weights(on_disk).equal(last) and not (tmp_path / "disk" / "kept").exists()
    # training goes on from the last iterate, bit for bit as if nothing had been averaged
    assert _train(on_disk, 2).equal(_train(_averaging_engine(tmp_path / "straight", 6), 0))


def test_averaged_puts_the_last_iterate_back_in_cpu_memory_too():
    engine = _averaging_engine()
    last = masters(engine)
    with averaged(engine, 2):
        assert not masters(engine).equal(last)
    assert masters(engine).equal(last)
    assert _train(engine, 2).equal(_train(_averaging_engine(steps=6), 0))


# ------------------------------------------------------------------------------ killed processes
_WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from tiny import make_batch
    from zo2 import ZOConfig
    from zo2.loading import from_pretrained
    from zo2.offload.disk import journal, kept
    from zo2.tuning import averaged, search_lr

    mode, checkpoint, offload = sys.argv[1:4]
    TRAIN = [make_batch(batch=4, length=8, seed=s) for s in range(3)]
    VALIDATION = [make_batch(batch=4, length=8, seed=10 + s) for s in range(2)]


    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)


    def then_die(function):
        def wrapper(*args, **kwargs):
            function(*args, **kwargs)
            die()
        return wrapper


    put_backs = []


    def link_or_copy(source, target, original=kept._link_or_copy):
        if target.suffix == ".tmp":
            put_backs.append(target)
            if len(put_backs) == 2:  # the first unit file is back, the second not yet
                die()
        original(source, target)


    if mode == "keep":  # the kept folder is made, its marker not yet written
        kept.write_json = die
    elif mode == "rewind":  # the journal is back at step 0, the files still hold the first candidate
        journal.Journal.rewind = then_die(journal.Journal.rewind)
    elif mode == "put-back":
        kept._link_or_copy = link_or_copy
    calls = []


    def stop():
        calls.append(1)
        if mode == "candidate" and len(calls) == 6:  # the second candidate's third step
            die()
        return False


    lr = 1e-3 if mode == "average" else "auto"
    engine = from_pretrained(checkpoint, ZOConfig(working_device="cpu", seed=3, lr=lr, eps=1e-3,
                                                  offloading_device="disk", offload_dir=offload), resume=True)
    if mode == "average":
        for step in range(4):
            engine.step(TRAIN[step % 3])
        with averaged(engine, 0.5):
            die()
    search_lr(engine, lambda step: TRAIN[step % 3], VALIDATION, steps=3, factors=(0.3, 1.0, 30.0),
              should_stop=stop)
    print("the search finished", flush=True)
""")


def _killed(tmp_path, mode: str):
    """The checkpoint, and an offload folder left by a process killed at ``mode`` (SIGKILL)."""
    checkpoint, offload = tmp_path / "checkpoint", tmp_path / "offload"
    make_model("llama").save_pretrained(checkpoint)
    script = _WORKER.format(tests=os.path.dirname(__file__))
    run = subprocess.run([sys.executable, "-c", script, mode, str(checkpoint), str(offload)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "ZO2_COMPILE_NOISE": "0"})
    assert run.returncode == -signal.SIGKILL, run.stdout + run.stderr[-3000:]
    assert foreign_files(offload) == []  # zo2 owns what it kept
    return checkpoint, offload


def _reference(checkpoint, folder, steps: int, lr) -> ZOEngine:
    engine = from_pretrained(checkpoint, _config(lr, folder))
    _train(engine, steps, 1e-3)
    return engine


@pytest.mark.parametrize("mode", ["keep", "candidate", "rewind", "put-back"])
def test_a_search_killed_at_any_point_reopens_at_the_start(tmp_path, mode):
    checkpoint, offload = _killed(tmp_path, mode)
    assert (offload / "kept").is_dir() and (offload / "kept.json").exists() == (mode != "keep")
    lines = len((offload / "journal.jsonl").read_bytes().splitlines())
    assert lines > 1 if mode == "candidate" else lines == 1  # candidate steps journaled / rewound
    if mode == "candidate":  # clear_folder knows the kept files: a copy of the folder is emptied
        shutil.copytree(offload, tmp_path / "copy")
        clear_folder(tmp_path / "copy")
        assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["lock"]
    engine = from_pretrained(checkpoint, _config("auto", offload), resume=True)
    fresh = _reference(checkpoint, tmp_path / "fresh", 0, "auto")
    _at_the_start(engine, weights(fresh))
    assert _train(engine, 2, 1e-3).equal(_train(fresh, 2, 1e-3))


def test_averaging_killed_inside_the_block_reopens_at_the_last_iterate(tmp_path):
    checkpoint, offload = _killed(tmp_path, "average")
    assert (offload / "kept.json").exists()
    changed = [p.name for p in (offload / "kept").iterdir() if p.read_bytes() != (offload / p.name).read_bytes()]
    assert changed  # the files held the average when the process died
    straight = _reference(checkpoint, tmp_path / "straight", 4, 1e-3)
    engine = from_pretrained(checkpoint, _config(1e-3, offload), resume=True)
    assert engine.step_count == 4 and weights(engine).equal(weights(straight))
    assert not (offload / "kept.json").exists() and not (offload / "kept").exists()
    assert _train(engine, 2).equal(_train(straight, 2))
