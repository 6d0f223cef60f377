"""Streaming load and save: a checkpoint streamed unit by unit equals ``from_pretrained`` bit for bit,
never holds the model in host memory, and saves back to a folder ``from_pretrained`` reads."""
import os
import subprocess
import sys

import pytest
import torch
from test_disk import weights
from tiny import make_batch, make_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from zo2 import ZOConfig, ZOEngine
from zo2.checkpoint import load_checkpoint, save_checkpoint
from zo2.loading import from_checkpoint, from_pretrained, save_pretrained
from zo2.persist.compat import UnsupportedCheckpointError
from zo2.persist.shards import ShardError

#: rotary inv_freq (llama, qwen3, gpt_neox: also a renamed key), learned positions (opt, gpt2),
#: ALiBi (bloom), embedding scales as buffers (gemma3_text), tied heads (llama-tied), partial rotary (phi)
ARCHS = ["llama", "llama-tied", "opt", "gpt2", "qwen3", "gpt_neox", "bloom", "gemma3_text", "phi", "falcon"]


def _saved(tmp_path, arch, dtype=torch.float32, **overrides):
    folder = tmp_path / "checkpoint"
    make_model(arch, **overrides).to(dtype).save_pretrained(folder, max_shard_size="8KB")  # several shards
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _logits(engine):
    batch = make_batch()
    return engine.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _config(**extra):
    return ZOConfig(working_device="cpu", lr=1e-2, eps=1e-3, weight_decay=0.1, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_model_equals_from_pretrained(tmp_path, arch, dtype):
    folder = _saved(tmp_path, arch, dtype)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    streamed = from_pretrained(folder, _config(), dtype=dtype)
    expected, mine = dict(reference.named_buffers()), dict(streamed.model.named_buffers())
    assert list(mine) == list(expected)  # the same buffers, in the same order
    for name, buffer in mine.items():
        assert torch.equal(buffer, expected[name]), name
    assert torch.equal(_logits(ZOEngine(reference, _config())), _logits(streamed))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "llama-tied"])
def test_streamed_to_disk_trains_like_from_pretrained(tmp_path, arch):
    folder = _saved(tmp_path, arch, num_hidden_layers=3)
    (tmp_path / "offload").mkdir()
    streamed = from_pretrained(folder, _config(offloading_device="disk", offload_dir=str(tmp_path / "offload"),
                                               write_back_every=2))
    reference = ZOEngine(AutoModelForCausalLM.from_pretrained(folder), _config())
    assert torch.equal(_logits(streamed), _logits(reference))
    for step in range(4):
        assert streamed.step(make_batch(seed=step)) == reference.step(make_batch(seed=step))
    assert torch.equal(weights(streamed), weights(reference))


def test_dtype_follows_from_pretrained(tmp_path):
    folder = _saved(tmp_path, "llama", torch.bfloat16)
    for dtype in (None, "auto", torch.float16, "float32"):
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        streamed = from_pretrained(folder, _config(zo2=False), dtype=dtype)
        assert streamed.units[1].master.dtype == next(reference.parameters()).dtype
        assert torch.equal(_logits(streamed), _logits(ZOEngine(reference, _config(zo2=False))))
    stored = from_pretrained(folder, _config(storage_dtype="float16"), dtype="float32")  # two casts, as from_pretrained
    reference = ZOEngine(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), _config(storage_dtype="float16"))
    assert torch.equal(_logits(stored), _logits(reference))


def test_task_heads_stream_with_their_auto_class(tmp_path):
    folder = tmp_path / "checkpoint"
    make_model("llama", head="seq-cls").save_pretrained(folder)
    reference = AutoModelForSequenceClassification.from_pretrained(folder)
    streamed = from_pretrained(folder, _config(), model_class=AutoModelForSequenceClassification)
    assert torch.equal(_logits(ZOEngine(reference, _config())), _logits(streamed))


def test_checkpoints_zo2_cannot_stream_are_refused_clearly(tmp_path):
    with pytest.raises(UnsupportedCheckpointError, match="fused MoE experts"):
        from_pretrained(_saved(tmp_path, "mixtral"), _config())
    with pytest.raises(ShardError, match="no model.safetensors.index.json or model.safetensors"):
        from_pretrained(tmp_path, _config())


def test_save_pretrained_streams_a_disk_engine_to_a_folder_from_pretrained_reads(tmp_path):
    folder = _saved(tmp_path, "llama-tied", num_hidden_layers=3)
    (tmp_path / "offload").mkdir()
    engine = from_pretrained(folder, _config(offloading_device="disk", offload_dir=str(tmp_path / "offload")))
    for step in range(3):
        engine.step(make_batch(seed=step))
    saved = save_pretrained(engine, tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    trained = ZOEngine(reloaded, _config(zo2=False))
    assert torch.equal(weights(trained), weights(engine))


def test_checkpoint_of_a_disk_engine_resumes_by_streaming(tmp_path):
    folder = _saved(tmp_path, "llama", num_hidden_layers=3)
    offload = tmp_path / "offload"
    offload.mkdir()
    disk_config = dict(offloading_device="disk", offload_dir=str(offload), write_back_every=2)
    engine = from_pretrained(folder, _config(**disk_config))
    for step in range(3):
        engine.step(make_batch(seed=step))
    save_checkpoint(engine, tmp_path / "step-3")
    engine.store.close()
    with pytest.raises(Exception, match="from_checkpoint"):
        load_checkpoint(tmp_path / "step-3").restore(engine)
    restored = from_checkpoint(tmp_path / "step-3", _config(**disk_config))
    straight = ZOEngine(AutoModelForCausalLM.from_pretrained(folder), _config())
    for step in range(6):
        if step >= 3:
            assert restored.step(make_batch(seed=step)) == straight.step(make_batch(seed=step))
        else:
            straight.step(make_batch(seed=step))
    assert torch.equal(weights(restored), weights(straight))


_BLOCK = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)


def _peak_growth(tmp_path, layers):
    """(model MiB, peak RSS minus the RSS after imports, staging bytes) of a 2-step disk run in a fresh process."""
    folder, offload = tmp_path / f"checkpoint-{layers}", tmp_path / f"offload-{layers}"
    model = make_model("llama", num_hidden_layers=layers, **_BLOCK)
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    model.save_pretrained(folder)
    del model
    offload.mkdir()
    worker = os.path.join(os.path.dirname(__file__), "disk_worker.py")
    env = {**os.environ, "ZO2_COMPILE_NOISE": "0", "OMP_NUM_THREADS": "1"}  # see test_memory.py; 1 thread: speed
    run = subprocess.run([sys.executable, worker, folder, offload, tmp_path / "w.pt", "2", "--rss", "--noise",
                          "rademacher"], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    start, peak, held = map(float, run.stdout.split("RSS")[1].split())
    return model_mib, peak - start, held / 2**20


def test_host_memory_of_a_disk_run_does_not_grow_with_the_model(tmp_path):
    """Streaming load and two steps from disk of a model with 8x the blocks (320 MiB instead of 40 MiB)
    raise the process's peak RSS by less than 1/8 of the added weights: host memory holds the slots
    (two blocks), the perturbed copies of one block and fixed costs (the noise generator's temporaries,
    the model's module objects, a small batch's activations: about 60 MiB here, the same for both
    models), not the model. The peak is measured above the RSS after torch, transformers and the model's
    code are imported; comparing two depths cancels the fixed costs, so the 1/8 bound leaves a margin
    of about 5x over what the extra depth costs (module objects, ~6 MiB measured)."""
    small_mib, small_growth, small_held = _peak_growth(tmp_path, 16)
    large_mib, large_growth, large_held = _peak_growth(tmp_path, 128)
    assert large_mib > 7.5 * small_mib and large_mib > 300
    assert large_held == small_held < large_mib / 32  # the staging buffers: two blocks, whatever the depth
    assert large_growth - small_growth < (large_mib - small_mib) / 8, (small_growth, large_growth)
    assert large_growth < large_mib / 4
