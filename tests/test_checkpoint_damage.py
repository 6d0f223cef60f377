"""A damaged checkpoint is never "no checkpoint": a manifest that does not parse is an error naming it,
``find_intact_checkpoint`` falls back to the newest intact one with a warning, and pruning never deletes
an intact checkpoint because newer ones are damaged. Faults injected on real checkpoint folders."""
import logging

import pytest
from tiny import make_batch, make_model

from zo2 import ZOConfig, ZOEngine
from zo2.checkpoint import find_intact_checkpoint, latest_checkpoint, prune_checkpoints, save_checkpoint
from zo2.persist.manifest import MANIFEST_NAME, CheckpointError


def _checkpoints(folder, steps=4):
    """``folder/step-00000N`` for N = 1..steps, one per step of a tiny run."""
    engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", lr=1e-2, eps=1e-3))
    for step in range(steps):
        engine.step(make_batch(seed=step))
        save_checkpoint(engine, folder / f"step-{step + 1:06d}")
    return [folder / f"step-{step + 1:06d}" for step in range(steps)]


def _cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_a_truncated_manifest_is_an_error_and_the_newest_intact_checkpoint_is_found(tmp_path, caplog):
    folders = _checkpoints(tmp_path)
    _cut_in_half(folders[3] / MANIFEST_NAME)
    _cut_in_half(next(folders[2].glob("*.safetensors")))
    with pytest.raises(CheckpointError, match=r"step-000004/zo2_manifest.json: manifest .* is not valid JSON"):
        latest_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING):
        found = find_intact_checkpoint(tmp_path)
    assert found.checkpoint.path == folders[1] and found.checkpoint.step == 2
    assert [path for path, _ in found.damaged] == [folders[3], folders[2]]
    assert "not valid JSON" in found.damaged[0][1] and "truncated" in found.damaged[1][1]
    assert "step-000004 is damaged" in caplog.text and "falling back to the newest intact one" in caplog.text
    assert find_intact_checkpoint(tmp_path / "none").checkpoint is None


def test_pruning_never_deletes_an_intact_checkpoint_because_newer_ones_are_damaged(tmp_path):
    folders = _checkpoints(tmp_path)
    _cut_in_half(folders[3] / MANIFEST_NAME)
    (folders[2] / "zo2_state.json").unlink()
    assert prune_checkpoints(tmp_path, keep=1) == [folders[0]]
    assert sorted(tmp_path.iterdir()) == folders[1:]
    assert find_intact_checkpoint(tmp_path).checkpoint.path == folders[1]
