"""Disk offload: masters in files train exactly like resident ones; the staging buffers bound what the
backend holds; a full, read-only or missing folder is a clear error (real files in tmp_path)."""
import gc
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import make_batch, make_model

from zo2 import ZOConfig, ZOEngine
from zo2.loading import unit_weights
from zo2.offload.disk.aligned import ALIGN, live_buffer_bytes
from zo2.offload.disk.folder import DiskOffloadError, check_folder
from zo2.offload.disk.staging import staging_bytes
from zo2.offload.disk.store import HEADER_BYTES
from zo2.plan import BudgetError, block_locations, host_bytes, model_sizes, walk_shape

STEPS = 6


def weights(engine) -> torch.Tensor:
    """Every unit's flushed master (read from its file for a disk unit), concatenated."""
    engine.flush()
    return torch.cat([unit_weights(engine, unit).reshape(-1) for unit in engine.units])


def _config(**extra) -> ZOConfig:
    return ZOConfig(working_device="cpu", lr=1e-2, eps=1e-3, weight_decay=0.1, **extra)


def _train(engine, steps=STEPS):
    return [engine.step(make_batch(seed=step)) for step in range(steps)]


@pytest.mark.parametrize("config", [
    dict(),
    dict(storage_dtype="bfloat16", write_back_every=3),
    dict(write_back_every=2, perturbation_scope="module"),
    dict(storage_dtype="bfloat16", perturbation_scope="module", write_back_every=3, num_slots=1),
    dict(num_slots=3, noise="rademacher", write_back_every=2),
    dict(offload_io="buffered", write_back_every=2),
])
def test_disk_offloaded_equals_resident(tmp_path, config):
    numerics = {k: v for k, v in config.items() if k in ("storage_dtype", "noise", "num_directions")}
    resident = ZOEngine(make_model("llama", num_hidden_layers=4), _config(zo2=False, **numerics))
    on_disk = ZOEngine(make_model("llama", num_hidden_layers=4),
                       _config(offloading_device="disk", offload_dir=str(tmp_path), **config))
    assert all(on_disk.store.holds(u) for u in on_disk.units[1:-1])
    assert [r.projected_grad for r in _train(resident)] == [r.projected_grad for r in _train(on_disk)]
    assert torch.equal(weights(resident), weights(on_disk))
    assert not torch.equal(weights(on_disk), weights(ZOEngine(make_model("llama", num_hidden_layers=4), _config())))


@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama-tied"])
def test_disk_offload_across_architectures(tmp_path, arch):
    resident = ZOEngine(make_model(arch), _config(zo2=False))
    on_disk = ZOEngine(make_model(arch), _config(offloading_device="disk", offload_dir=str(tmp_path)))
    assert all(on_disk.store.holds(u) for u in on_disk.units[1:-1])
    _train(resident, 4), _train(on_disk, 4)
    assert torch.equal(weights(resident), weights(on_disk))


def _frozen_attention_model():
    model = make_model("llama", num_hidden_layers=4)
    for name, param in model.named_parameters():
        if "self_attn" in name:
            param.requires_grad_(False)
    return model


@pytest.mark.parametrize("offload_trainable", [False, True])
def test_frozen_parts_on_disk_are_read_and_never_rewritten(tmp_path, offload_trainable):
    """Frozen attention beside trainable MLPs: the frozen units live on disk
    (and the trainable ones too with offload_trainable=True); training equals resident training bitwise,
    and no frozen unit's file is ever rewritten (it holds the weights it was built with)."""
    config = dict(write_back_every=2)
    resident = ZOEngine(_frozen_attention_model(), _config(zo2=False, **config))
    on_disk = ZOEngine(_frozen_attention_model(), _config(offloading_device="disk", offload_dir=str(tmp_path),
                                                          offload_trainable=offload_trainable, **config))
    frozen = [u for u in on_disk.units if not u.trainable]
    assert frozen and all(on_disk.store.holds(u) for u in frozen)
    trainable_blocks = [u for u in on_disk.units if u.trainable and u.name.startswith("block")]
    assert all(on_disk.store.holds(u) == offload_trainable for u in trainable_blocks)
    writes_at_start = on_disk.store.writes
    assert [r.projected_grad for r in _train(resident)] == [r.projected_grad for r in _train(on_disk)]
    assert torch.equal(weights(resident), weights(on_disk))
    assert all(on_disk.store.applied(u.index) == 0 for u in frozen)
    expected_writes = len(trainable_blocks) * (STEPS // 2) if offload_trainable else 0
    assert on_disk.store.writes - writes_at_start == expected_writes


def test_host_budget_keeps_leading_blocks_in_memory_and_the_rest_on_disk(tmp_path):
    model = make_model("llama", num_hidden_layers=4)
    config = _config(offloading_device="disk", offload_dir=str(tmp_path))
    sizes = model_sizes(model)
    split = ["host", "host", "disk", "disk"]
    budget = host_bytes(sizes, split, config, "unit", walk_shape(config).perturbed_per_walk, accelerator=False)
    config = _config(offloading_device="disk", offload_dir=str(tmp_path), host_memory_budget=budget)
    assert block_locations(config, sizes, accelerator=False) == split
    engine = ZOEngine(model, config)
    assert [engine.store.holds(u) for u in engine.units] == [False, False, False, True, True, False]
    assert all(u.offloaded for u in engine.units[1:-1])
    resident = ZOEngine(make_model("llama", num_hidden_layers=4), _config(zo2=False))
    _train(engine), _train(resident)
    assert torch.equal(weights(engine), weights(resident))
    with pytest.raises(BudgetError, match="host_memory_budget"):
        ZOEngine(make_model("llama"), _config(offloading_device="disk", offload_dir=str(tmp_path),
                                              host_memory_budget="1KB"))


def test_write_back_every_k_writes_k_times_less(tmp_path):
    written = {}
    for k in (1, 4):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        engine = ZOEngine(make_model("llama", num_hidden_layers=4),
                          _config(offloading_device="disk", offload_dir=str(folder), write_back_every=k))
        initial = engine.store.bytes_written
        _train(engine, 8)
        engine.flush()
        written[k] = engine.store.bytes_written - initial
        assert engine.store.bytes_read == (8 + 1) * initial  # once per step, and once by the flush
    assert written[1] == 4 * written[4] > 0


def _live_disk_buffer_bytes() -> int:
    gc.collect()
    return live_buffer_bytes()


@pytest.mark.parametrize("layers", [4, 12])
def test_the_backend_holds_its_staging_buffers_and_nothing_more(tmp_path, layers):
    """What the disk backend allocates (every aligned buffer alive, measured during the walk) is its
    slots and one header block, whatever the model's depth; disk units' parameters hold no weights."""
    before = _live_disk_buffer_bytes()
    engine = ZOEngine(make_model("llama", num_hidden_layers=layers, hidden_size=64, intermediate_size=128),
                      _config(offloading_device="disk", offload_dir=str(tmp_path), write_back_every=2))
    bound = staging_bytes(engine.store, engine.config.num_slots) + HEADER_BYTES + ALIGN
    peaks = []
    hooks = [block.register_forward_hook(lambda *_: peaks.append(live_buffer_bytes() - before))
             for block in engine.model.model.layers]
    _train(engine, 3)
    engine.flush()
    for hook in hooks:
        hook.remove()
    block_bytes = engine.units[1].numel * 4
    assert bound < 3 * block_bytes + 3 * ALIGN  # two slots of one block each, a header, alignment
    assert max(peaks) == bound == _live_disk_buffer_bytes() - before
    for unit in engine.units[1:-1]:
        assert unit.master.untyped_storage().nbytes() == unit.master.element_size()
        assert all(p.untyped_storage().nbytes() == p.element_size() for p in unit.params)


def test_missing_folder_is_made_and_one_that_cannot_be_is_refused_before_anything_is_written(tmp_path):
    ZOEngine(make_model("llama"), _config(offloading_device="disk", offload_dir=str(tmp_path / "new" / "offload")))
    assert (tmp_path / "new" / "offload" / "store.json").is_file()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DiskOffloadError, match="does not exist and cannot be created"):
        ZOEngine(make_model("llama"), _config(offloading_device="disk", offload_dir=str(tmp_path / "a-file" / "sub")))
    shutil.rmtree(tmp_path / "new")
    (tmp_path / "a-file").unlink()
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(DiskOffloadError, match="GB free, disk offload needs"):
        check_folder(tmp_path, 2 * free + 1)
    assert list(tmp_path.iterdir()) == []


def test_one_folder_serves_one_engine(tmp_path):
    first = ZOEngine(make_model("llama"), _config(offloading_device="disk", offload_dir=str(tmp_path)))
    with pytest.raises(DiskOffloadError, match="in use by another zo2 engine"):
        ZOEngine(make_model("llama"), _config(offloading_device="disk", offload_dir=str(tmp_path)))
    first.store.close()
    ZOEngine(make_model("llama"), _config(offloading_device="disk", offload_dir=str(tmp_path)))


_READ_ONLY = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from tiny import make_model
    from zo2 import ZOConfig, ZOEngine
    from zo2.offload.disk.store import DiskOffloadError
    try:
        ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", offloading_device="disk", offload_dir={folder!r}))
    except DiskOffloadError as err:
        print("ERROR", err)
""")


def test_read_only_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    script = _READ_ONLY.format(tests=os.path.dirname(__file__), folder=str(folder))
    command = [sys.executable, "-c", script]
    if os.access(folder, os.W_OK):  # root ignores permission bits: make the folder a read-only mount instead
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: cannot make a read-only folder")
        command = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && '
                   'exec "$@"', str(folder), *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if "mount" in out.stderr and "ERROR" not in out.stdout:
        pytest.skip(f"cannot mount a read-only folder here: {out.stderr.strip()[:200]}")
    assert "ERROR cannot write to ZOConfig.offload_dir" in out.stdout, out.stderr
    assert "Read-only file system" in out.stdout or "Permission denied" in out.stdout


# ------------------------------------------------------------------------ real processes, real signals
WORKER = os.path.join(os.path.dirname(__file__), "disk_worker.py")


def _worker(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ZO2_COMPILE_NOISE": "0"}
    return subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _checkpoint(tmp_path):
    folder = tmp_path / "checkpoint"
    make_model("llama", num_hidden_layers=4, hidden_size=32, intermediate_size=64).save_pretrained(folder)
    return folder


def _straight(checkpoint, steps):
    """The same run in this process, resident, never interrupted."""
    from transformers import AutoModelForCausalLM
    engine = ZOEngine(AutoModelForCausalLM.from_pretrained(checkpoint), _config(zo2=False))
    _train(engine, steps)
    return weights(engine)


def test_killed_during_write_backs_then_resumed_equals_uninterrupted(tmp_path):
    """kill -9 half-way through writing a master, then just before its rename, then between the
    journal and the master file: each restart resumes from the folder, and the run ends bit for bit
    where an uninterrupted one ends."""
    checkpoint, offload, out = _checkpoint(tmp_path), tmp_path / "offload", tmp_path / "weights.pt"
    offload.mkdir()
    resumed_at = []
    for point, step in (("data", 2), ("rename", 4), ("journal", 6)):
        run = _worker(checkpoint, offload, out, 9, "--kill-at", point, "--kill-step", step)
        assert run.returncode == -9, run.stderr[-2000:]
        resumed_at.append(int(run.stdout.split()[2]))
        if point != "journal":
            assert list(offload.glob("unit-*.tmp")), "the kill did not happen during a write"
    final = _worker(checkpoint, offload, out, 9)
    assert final.returncode == 0, final.stderr[-2000:]
    resumed_at.append(int(final.stdout.split()[2]))
    assert resumed_at[0] == 0 and resumed_at == sorted(resumed_at) and resumed_at[-1] > 0
    assert torch.equal(torch.load(out), _straight(checkpoint, 9))


def test_a_file_size_limit_is_a_clear_error_at_start_up_and_mid_run(tmp_path):
    """RLIMIT_FSIZE makes writes past it fail with EFBIG (as a full disk fails with ENOSPC): at start-up
    the engine refuses with the reason; mid-run the step fails, the file it was rewriting is intact, and
    a restart without the limit resumes and ends where an uninterrupted run ends."""
    checkpoint, offload, out = _checkpoint(tmp_path), tmp_path / "offload", tmp_path / "weights.pt"
    offload.mkdir()
    start = _worker(checkpoint, offload, out, 2, "--fsize-limit", 8192)
    assert "ERROR writing block.0" in start.stdout and "File too large" in start.stdout, start.stderr[-2000:]
    assert "file-size limit" in start.stdout and not list(offload.glob("unit-*.tmp"))
    mid = _worker(checkpoint, offload, out, 6, "--fsize-limit", 8192, "--limit-after-step", 3)
    assert "ERROR writing block." in mid.stdout and "previous copy of the file is intact" in mid.stdout, mid.stderr
    assert not list(offload.glob("unit-*.tmp"))
    final = _worker(checkpoint, offload, out, 6)
    assert final.returncode == 0 and int(final.stdout.split()[2]) > 0, final.stderr[-2000:]
    assert torch.equal(torch.load(out), _straight(checkpoint, 6))
