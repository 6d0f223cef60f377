"""Exact resume: train N steps, stop, resume, train N more == 2N steps straight (same bits, same loss
log), after a clean stop and after ``kill -9`` of a real training process; a partial or corrupt
checkpoint is never resumed from."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_worker import build_trainer, train_losses, weights

from zo2.checkpoint import MANIFEST_NAME, CheckpointError, load_checkpoint

WORKER = Path(__file__).with_name("trainer_worker.py")


def test_stop_after_n_steps_and_resume_equals_2n_steps_straight(tmp_path):
    # Offloaded blocks (zo2=True): the checkpoint's weights must also reach the offloaded masters.
    common = dict(lr_scheduler_type="constant_with_warmup", warmup_steps=2, save_strategy="steps", save_steps=3,
                  zo_config={"zo2": True, "offloading_blocks": [1]})
    straight = build_trainer(tmp_path / "straight", max_steps=6, **common)
    straight.train()
    first = build_trainer(tmp_path / "run", max_steps=3, **common)
    first.train()
    resumed = build_trainer(tmp_path / "run", max_steps=6, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert resumed.zo_engine.step_count == 6
    assert torch.equal(weights(resumed), weights(straight))
    assert {**train_losses(first), **train_losses(resumed)} == train_losses(straight)
    assert [u.lr for u in resumed.zo_engine.history] == [u.lr for u in straight.zo_engine.history]


def _wait_for(path: Path, process: subprocess.Popen, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the training process exited ({process.returncode}) before {path.name}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the training process never wrote {path.name}")
        time.sleep(0.2)


def test_kill_9_mid_run_then_resume_ends_identical_to_an_uninterrupted_run(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    # Trains with a linear lr schedule over 8 steps, saves every 2, and hangs at the end of step 5.
    process = subprocess.Popen([sys.executable, str(WORKER), "hang", str(out), "8", "2", "5"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(out / "hanging", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (out / "checkpoint-4" / MANIFEST_NAME).is_file()
    # As if killed while saving step 6: a newer checkpoint without its manifest must be skipped.
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")
    (out / "checkpoint-6" / MANIFEST_NAME).unlink()

    common = dict(max_steps=8, save_strategy="steps", save_steps=2)
    resumed = build_trainer(out, **common)
    resumed.train(resume_from_checkpoint=True)
    straight = build_trainer(tmp_path / "straight", **common)
    straight.train()
    assert resumed.zo_engine.step_count == 8
    assert torch.equal(weights(resumed), weights(straight))
    # The resumed log holds steps 1-4 from the checkpoint's trainer state and steps 5-8 trained again.
    assert train_losses(resumed) == train_losses(straight)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / MANIFEST_NAME).unlink(), "missing manifest"),
    (lambda d: (d / "optimizer.pt").write_bytes(b"\0" + (d / "optimizer.pt").read_bytes()[1:]), "sha256"),
])
def test_a_partial_or_corrupt_checkpoint_is_not_resumed(tmp_path, damage, message):
    trainer = build_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    damage(tmp_path / "checkpoint-2")
    with pytest.raises(CheckpointError, match=message):
        build_trainer(tmp_path, max_steps=4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    if message == "missing manifest":  # nothing complete is left to resume from
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            build_trainer(tmp_path, max_steps=4).train(resume_from_checkpoint=True)


def test_load_best_model_at_end_restores_the_best_checkpoints_weights_and_engine_state(tmp_path):
    trainer = build_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps",
                            eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer.train()
    best = load_checkpoint(trainer.state.best_model_checkpoint)
    assert trainer.zo_engine.step_count == best.step
    fresh = build_trainer(tmp_path / "fresh", max_steps=4)
    best.restore(fresh.zo_engine)
    assert torch.equal(weights(trainer), weights(fresh))
