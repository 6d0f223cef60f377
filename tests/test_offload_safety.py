"""Disk offload never loses what a user owns: it writes and deletes only its own files, one process holds a
folder (a lock the kernel drops when the process dies), and damaged state (store.json, journal, a unit's
bytes, a unit file deleted mid-run) stops with an error naming the file, never a fresh start or silently
wrong weights. Faults are injected on real files and a real killed subprocess."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import make_batch, make_model

from zo2 import ZOConfig, ZOEngine
from zo2.loading import from_pretrained
from zo2.offload.disk.folder import DiskOffloadError, clear_folder, foreign_files
from zo2.offload.disk.store import HEADER_BYTES

BIG = dict(hidden_size=64, intermediate_size=256)  # a block of ~260 KB: room for 64 KB of damage


def _config(folder, **extra) -> ZOConfig:
    return ZOConfig(working_device="cpu", lr=1e-2, eps=1e-3, offloading_device="disk", offload_dir=str(folder),
                    **extra)


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "lock"}


def _trained(tmp_path, steps=3):
    """A checkpoint and a disk-offloaded run of ``steps`` steps on it, closed: (checkpoint, offload folder)."""
    checkpoint, offload = tmp_path / "base", tmp_path / "offload"
    make_model("llama", **BIG).save_pretrained(checkpoint)
    engine = from_pretrained(checkpoint, _config(offload), resume=True)
    for step in range(steps):
        engine.step(make_batch(seed=step))
    engine.flush()
    engine.store.close()
    return checkpoint, offload


# ------------------------------------------------------------------------------- what it owns
@pytest.mark.parametrize("foreign", [["results.json", "config.json"], "model"])
def test_a_folder_holding_other_files_is_refused_and_left_intact(tmp_path, foreign):
    folder = tmp_path / "folder"
    if foreign == "model":  # a Hugging Face model folder: config.json, safetensors, generation_config.json
        make_model("llama").save_pretrained(folder)
    else:
        folder.mkdir()
        for name in foreign:
            (folder / name).write_text('{"keep": true}')
    before = _snapshot(folder)
    with pytest.raises(DiskOffloadError, match=r"holds files zo2 did not write \(.*config.json.*offload_dir at an "
                                               r"empty or new folder"):
        ZOEngine(make_model("llama"), _config(folder))
    assert _snapshot(folder) == before and foreign_files(folder) == sorted(before)


def test_a_trained_folder_is_never_wiped_without_resume(tmp_path):
    checkpoint, offload = _trained(tmp_path)
    before = _snapshot(offload)
    with pytest.raises(DiskOffloadError, match="holds a run with 3 trained steps: pass resume=True .*clear_folder"):
        from_pretrained(checkpoint, _config(offload))
    assert _snapshot(offload) == before
    resumed = from_pretrained(checkpoint, _config(offload), resume=True)
    assert resumed.step_count == 3
    resumed.store.close()
    (offload / "notes.txt").write_text("mine")
    clear_folder(offload)  # deletes zo2's files only
    assert sorted(p.name for p in offload.iterdir()) == ["lock", "notes.txt"]


_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from tiny import make_model
    from zo2 import ZOConfig, ZOEngine
    engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", offloading_device="disk",
                                                    offload_dir={folder!r}))
    print("ready", flush=True)
    time.sleep(600)
""")


def test_the_lock_of_a_process_killed_by_sigkill_does_not_stay(tmp_path):
    """Invariant: one engine per folder. A second engine is refused while the first process lives; kill -9
    of that process frees the folder (an OS lock, released by the kernel)."""
    script = _HOLDER.format(tests=os.path.dirname(__file__), folder=str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(DiskOffloadError, match="in use by another zo2 engine"):
            ZOEngine(make_model("llama"), _config(tmp_path))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    ZOEngine(make_model("llama"), _config(tmp_path))


# ------------------------------------------------------------------------------- damaged state
def test_a_store_json_cut_in_half_stops_resume_and_keeps_the_trained_files(tmp_path):
    checkpoint, offload = _trained(tmp_path)
    store = offload / "store.json"
    store.write_bytes(store.read_bytes()[:len(store.read_bytes()) // 2])
    before = _snapshot(offload)
    for resume in (True, False):
        with pytest.raises(DiskOffloadError, match=r"store.json is damaged .*clear_folder"):
            from_pretrained(checkpoint, _config(offload), resume=resume)
    assert _snapshot(offload) == before


def test_a_damaged_journal_line_stops_resume_naming_it(tmp_path):
    checkpoint, offload = _trained(tmp_path)
    journal = offload / "journal.jsonl"
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join([lines[0], lines[1], b"{garbage", *lines[3:]]))
    before = _snapshot(offload)
    with pytest.raises(DiskOffloadError, match=r"journal.jsonl is damaged: line 3 is not valid JSON"):
        from_pretrained(checkpoint, _config(offload), resume=True)
    assert _snapshot(offload) == before


@pytest.mark.parametrize("damage,io", [("zeros", "auto"), ("random", "auto"), ("zeros", "buffered")])
def test_a_damaged_unit_file_is_an_error_naming_it(tmp_path, damage, io):
    checkpoint, offload = _trained(tmp_path)
    unit = offload / "unit-00001-master.zo2"
    data = bytearray(unit.read_bytes())
    size = 64 << 10
    assert len(data) > HEADER_BYTES + 2 * size
    noise = bytes(size) if damage == "zeros" else torch.randint(0, 256, (size,), dtype=torch.uint8,
                                                               generator=torch.Generator().manual_seed(0)).numpy()
    data[HEADER_BYTES + size:HEADER_BYTES + 2 * size] = bytes(noise)
    unit.write_bytes(bytes(data))
    engine = from_pretrained(checkpoint, _config(offload, offload_io=io), resume=True)
    with pytest.raises(DiskOffloadError, match=r"unit-00001-master.zo2 \(unit block.0\) is damaged: its data "
                                               r"does not match the crc32"):
        engine.step(make_batch(seed=3))


def test_a_unit_file_deleted_mid_run_is_one_clear_error(tmp_path):
    engine = ZOEngine(make_model("llama"), _config(tmp_path))
    engine.step(make_batch(seed=0))
    engine.flush()
    (tmp_path / "unit-00002-master.zo2").unlink()
    with pytest.raises(DiskOffloadError, match=r"unit-00002-master.zo2 \(unit block.1\) is missing: it was "
                                               "deleted while the run used"):
        engine.step(make_batch(seed=1))
