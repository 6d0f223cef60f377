"""The CUDA path (streams, events, pinned masters): runs only where a GPU is present."""
import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine
from zo2.updates import noise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_noise_on_the_gpu_matches_the_cpu():
    for kind in ("rademacher", "uniform"):
        assert torch.equal(noise.generate(kind, 3, 1, 5, 100_000, device="cuda").cpu(),
                           noise.generate(kind, 3, 1, 5, 100_000))
    gpu = noise.generate("gaussian", 3, 1, 5, 100_000, device="cuda").cpu()
    torch.testing.assert_close(gpu, noise.generate("gaussian", 3, 1, 5, 100_000), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_slots", [1, 2, 3])
def test_offloaded_equals_resident_on_cuda(num_slots):
    batch = make_batch()
    results = []
    for zo2 in (False, True):
        engine = ZOEngine(make_model("llama", num_hidden_layers=6),
                          ZOConfig(working_device="cuda", zo2=zo2, num_slots=num_slots, lr=1e-2, weight_decay=0.1))
        for _ in range(10):
            engine.step(batch)
        results.append(masters(engine))
        if zo2:
            assert all(u.master.is_pinned() for u in engine.units if u.offloaded)
            assert engine.scope == "module"  # auto, with blocks streaming to the GPU
    assert torch.equal(*results)


@pytest.mark.parametrize("config", [dict(write_back_every=3), dict(storage_dtype="bfloat16"),
                                    dict(noise="rademacher", num_directions=2)])
def test_offload_settings_do_not_change_the_result_on_cuda(config):
    batch = make_batch()
    results = []
    for zo2 in (False, True):
        resident_only = {k: v for k, v in config.items() if k != "write_back_every"}
        engine = ZOEngine(make_model("llama", num_hidden_layers=4),
                          ZOConfig(working_device="cuda", zo2=zo2, lr=1e-2, **(config if zo2 else resident_only)))
        for _ in range(7):
            engine.step([batch, batch])
        results.append(masters(engine))
    assert torch.equal(*results)


def test_gpu_memory_budget_places_blocks_on_cuda():
    engine = ZOEngine(make_model("llama", num_hidden_layers=6), ZOConfig(working_device="cuda", gpu_memory_budget="1GB"))
    assert not any(u.offloaded for u in engine.units)
    assert all(u.master.is_cuda for u in engine.units)


@pytest.mark.parametrize("zo2", [False, True])
def test_module_scope_lowers_the_allocator_peak_on_cuda(zo2):
    """Unit scope allocates both perturbed copies of a block; module scope one matrix at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = torch.randint(0, 512, (1, 16))
    peaks, results = {}, []
    for scope in ("unit", "module"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=4096,
                                             num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8))
        block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
        engine = ZOEngine(model, ZOConfig(working_device="cuda", zo2=zo2, perturbation_scope=scope))
        engine.step({"input_ids": ids, "labels": ids})
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        engine.step({"input_ids": ids, "labels": ids})
        peaks[scope] = torch.cuda.max_memory_allocated() - base
        results.append(masters(engine))
        del engine, model
    assert torch.equal(*results)
    assert peaks["module"] < peaks["unit"] - block, peaks
