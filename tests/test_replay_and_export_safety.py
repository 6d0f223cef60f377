"""What a run hands back is the trained model or a clear error: ``zo2 replay`` checks its base (names, shapes,
the fingerprint recorded when the seed log was written) and never writes over its inputs; a truncated
safetensors file is named; ``detach()`` and the ZO2-style ``save_pretrained`` of a disk-offloaded model
give the trained weights bit for bit. Real files, real tiny models."""
import json
import logging

import pytest
import torch
from tiny import make_batch, make_model
from transformers import AutoModelForCausalLM

from zo2 import ZOConfig, ZOEngine
from zo2.checkpoint import replay_seed_log, save_checkpoint, save_seed_log
from zo2.cli.main import main
from zo2.hf import zo_hf_init
from zo2.loading import from_pretrained, unit_weights
from zo2.persist.shards import ShardError

CONFIG = dict(working_device="cpu", lr=1e-2, eps=1e-3)


def _run(tmp_path, layers=2):
    """A base folder, a run of 3 steps on it, its seed log and checkpoint: (base, log, checkpoint, engine)."""
    base = tmp_path / "base"
    make_model("llama", num_hidden_layers=layers).save_pretrained(base)
    engine = ZOEngine(AutoModelForCausalLM.from_pretrained(base), ZOConfig(**CONFIG))
    for step in range(3):
        engine.step(make_batch(seed=step))
    return base, save_seed_log(engine, tmp_path / "log.json"), save_checkpoint(engine, tmp_path / "ckpt"), engine


def _replay(capsys, base, log, output) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["replay", "--base", str(base), "--seed-log", str(log), "--output", str(output)])
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_replay_onto_another_depth_or_the_fine_tuned_model_is_refused(tmp_path, capsys):
    base, log, checkpoint, _ = _run(tmp_path)
    make_model("llama", num_hidden_layers=3).save_pretrained(tmp_path / "deeper")
    err = _replay(capsys, tmp_path / "deeper", log, tmp_path / "out")
    assert "is not the one" in err and "(30 parameters against 21 in the run's base): another architecture or depth" \
        in err
    err = _replay(capsys, checkpoint, log, tmp_path / "out")  # the updates would be applied twice
    assert "same parameters but other weights" in err and "fine-tuned checkpoint" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["base", "base/sub", "parent", "checkpoint"])
def test_replay_never_writes_over_its_inputs(tmp_path, capsys, where):
    base, log, checkpoint, _ = _run(tmp_path)
    output = {"base": base, "base/sub": base / "sub", "parent": tmp_path, "checkpoint": checkpoint}[where]
    before = {p: p.read_bytes() for p in [*base.iterdir(), *checkpoint.iterdir()]}
    err = _replay(capsys, base, checkpoint / "zo2_seed_log.json", output)
    assert "--output" in err and ("--base" in err or "seed log's folder" in err)
    assert {p: p.read_bytes() for p in [*base.iterdir(), *checkpoint.iterdir()]} == before


def test_a_seed_log_without_a_fingerprint_replays_with_a_warning(tmp_path, caplog):
    base, log, _, engine = _run(tmp_path)
    data = json.loads(log.read_text())
    del data["base"]
    log.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = replay_seed_log(AutoModelForCausalLM.from_pretrained(base), log)
    assert "records no fingerprint of its base" in caplog.text
    trained = dict(engine.detach().named_parameters())
    assert all(torch.equal(p, trained[name]) for name, p in rebuilt.named_parameters())


def test_a_safetensors_file_cut_in_half_is_one_line_naming_it(tmp_path, capsys):
    base, log, _, _ = _run(tmp_path)
    shard = base / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"model.safetensors: truncated \(\d+ of the \d+ bytes"):
        from_pretrained(base, ZOConfig(**CONFIG))
    assert "model.safetensors: truncated" in _replay(capsys, base, log, tmp_path / "out")


def _disk_engine(tmp_path):
    engine = ZOEngine(make_model("llama", num_hidden_layers=3),
                      ZOConfig(offloading_device="disk", offload_dir=str(tmp_path / "offload"), **CONFIG))
    for step in range(3):
        engine.step(make_batch(seed=step))
    engine.flush()
    return engine


def test_detach_of_a_disk_engine_holds_the_trained_weights(tmp_path):
    engine = _disk_engine(tmp_path)
    expected = [unit_weights(engine, unit) for unit in engine.units]
    model = engine.detach()
    for unit, weights in zip(engine.units, expected):
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in unit.params]), weights[:unit.numel])
    model.save_pretrained(tmp_path / "saved")
    reloaded = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "saved").named_parameters())
    assert all(torch.equal(p.detach(), reloaded[name]) for name, p in model.named_parameters())
    assert not all(torch.equal(p.detach(), q) for (_, p), q in
                   zip(make_model("llama", num_hidden_layers=3).named_parameters(), reloaded.values()))


def test_zo2_style_save_pretrained_of_a_disk_model_writes_the_trained_weights(tmp_path):
    make_model("llama", num_hidden_layers=3).save_pretrained(tmp_path / "base")
    cfg = ZOConfig(offloading_device="disk", offload_dir=str(tmp_path / "offload"), **CONFIG)
    with zo_hf_init(cfg):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    engine = model.zo_init(cfg)
    model.zo_train()
    for step in range(3):
        model(**make_batch(seed=step))
    model.save_pretrained(tmp_path / "saved")
    expected = torch.cat([unit_weights(engine, unit).reshape(-1) for unit in engine.units])
    reloaded = ZOEngine(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), ZOConfig(**CONFIG))
    assert torch.equal(torch.cat([unit.master.reshape(-1) for unit in reloaded.units]), expected)
    base = ZOEngine(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), ZOConfig(**CONFIG))
    assert not torch.equal(torch.cat([unit.master.reshape(-1) for unit in base.units]), expected)
