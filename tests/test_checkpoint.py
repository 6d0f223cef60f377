"""Checkpoints: a saved run restores exactly, a seed log replays to the saved bits, and a partial or
corrupt checkpoint is refused with a clear error."""
import json

import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine
from zo2.checkpoint import (
    MANIFEST_NAME,
    SEED_LOG_NAME,
    STATE_NAME,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_seed_log,
    replay_seed_log,
    save_checkpoint,
    save_seed_log,
)

CONFIG = dict(working_device="cpu", lr=2e-3, eps=1e-3, seed=3)


def _trained(steps: int, arch: str = "llama", **config) -> ZOEngine:
    engine = ZOEngine(make_model(arch), ZOConfig(**{**CONFIG, **config}))
    for step in range(steps):
        engine.step(make_batch(seed=step))
    return engine


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_restore_continues_exactly_like_an_uninterrupted_run(tmp_path):
    straight = _trained(6)
    first = _trained(3)
    path = save_checkpoint(first, tmp_path / "ckpt", extra={"batches_seen": 3})
    checkpoint = load_checkpoint(path)
    assert checkpoint.step == 3 and checkpoint.extra == {"batches_seen": 3}
    resumed = ZOEngine(make_model("llama", seed=7), ZOConfig(**CONFIG))  # other weights: all must come from disk
    checkpoint.restore(resumed)
    for step in range(3, 6):
        resumed.step(make_batch(seed=step))
    assert resumed.step_count == 6
    assert torch.equal(masters(resumed), masters(straight))


def test_tied_weights_restore(tmp_path):
    engine = _trained(2, "llama-tied")
    checkpoint = load_checkpoint(save_checkpoint(engine, tmp_path / "ckpt"))
    fresh = ZOEngine(make_model("llama-tied", seed=5), ZOConfig(**CONFIG))
    checkpoint.restore(fresh)
    assert torch.equal(masters(fresh), masters(engine))


@pytest.mark.parametrize("storage_dtype", [None, "bfloat16"])
def test_seed_log_replays_to_the_saved_weights_bitwise(tmp_path, storage_dtype):
    engine = _trained(5, weight_decay=0.1, storage_dtype=storage_dtype)
    save_seed_log(engine, tmp_path / "log.json")
    log_bytes = (tmp_path / "log.json").stat().st_size
    assert log_bytes < 1000 + 100 * 5  # a few dozen bytes per step on top of the config
    rebuilt = replay_seed_log(make_model("llama"), tmp_path / "log.json")
    trained = _weights(engine.detach())
    for name, param in rebuilt.named_parameters():
        assert torch.equal(param.detach(), trained[name]), name
    base = _weights(make_model("llama"))  # in the storage dtype, as the trained weights
    assert any(not torch.equal(trained[name], base[name].to(trained[name].dtype)) for name in base)  # not a no-op


def test_replay_command_writes_the_fine_tuned_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from zo2.cli.main import main

    make_model("opt").save_pretrained(tmp_path / "base")
    engine = ZOEngine(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), ZOConfig(**CONFIG))
    for step in range(3):
        engine.step(make_batch(seed=step))
    save_seed_log(engine, tmp_path / "log.json")
    assert main(["replay", "--base", str(tmp_path / "base"), "--seed-log", str(tmp_path / "log.json"),
                 "--output", str(tmp_path / "out")]) == 0
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    trained = _weights(engine.detach())
    for name, param in rebuilt.named_parameters():
        assert torch.equal(param.detach(), trained[name]), name
    base = _weights(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    assert any(not torch.equal(trained[name], base[name]) for name in base)  # copying the base would not do


def test_saving_again_replaces_the_checkpoint_and_leaves_nothing_behind(tmp_path):
    engine = _trained(2)
    save_checkpoint(engine, tmp_path / "latest")
    engine.step(make_batch(seed=9))
    save_checkpoint(engine, tmp_path / "latest")
    assert load_checkpoint(tmp_path / "latest").step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    assert {MANIFEST_NAME, STATE_NAME, SEED_LOG_NAME, "config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "latest").iterdir()}


def _flip_byte(path, offset=-10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda d: _flip_byte(d / "model.safetensors"), "sha256"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-7]), "size"),
    (lambda d: (d / "config.json").unlink(), "config.json listed in the manifest is missing"),
    (lambda d: (d / MANIFEST_NAME).unlink(), "missing manifest"),
    (lambda d: (d / MANIFEST_NAME).write_text('{"files": {'), "not valid JSON"),
])
def test_a_partial_or_corrupt_checkpoint_is_refused(tmp_path, damage, message):
    path = save_checkpoint(_trained(1), tmp_path / "ckpt")
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_missing_checkpoint_and_bad_seed_log_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "log.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a zo2 seed log"):
        read_seed_log(tmp_path / "log.json")


def test_latest_checkpoint_skips_unfinished_saves(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    engine = _trained(1)
    save_checkpoint(engine, tmp_path / "step-1")
    engine.step(make_batch(seed=1))
    save_checkpoint(engine, tmp_path / "step-2")
    engine.step(make_batch(seed=2))
    unfinished = save_checkpoint(engine, tmp_path / "step-3")
    (unfinished / MANIFEST_NAME).unlink()  # as if killed before the manifest was written
    assert latest_checkpoint(tmp_path) == tmp_path / "step-2"
