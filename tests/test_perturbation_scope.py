"""Module-scoped perturbation: each weight matrix is perturbed by the module that owns it, for each half,
right before that module runs. Same bits as perturbing whole units, with one matrix in memory at a time."""
import pytest
import torch
from live_memory import live_tensor_bytes
from tiny import ARCHS, make_batch, make_model, masters
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from zo2 import ZOConfig, ZOEngine, plan
from zo2.offload.transfers import TransferScheduler
from zo2.units.partition import UnsupportedModelError, find_partition
from zo2.units.storage import SlotPool, Unit


def _train(model, steps=3, batches=None, **config):
    engine = ZOEngine(model, ZOConfig(working_device="cpu", lr=1e-2, weight_decay=0.1, **config))
    results = [engine.step(batch) for batch in (batches or [make_batch(seed=s) for s in range(steps)])]
    return engine, masters(engine), [(r.loss, r.loss_minus) for r in results]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_module_scope_gives_the_bits_of_unit_scope(arch):
    _, unit, unit_losses = _train(make_model(arch), zo2=False, perturbation_scope="unit")
    engine, module, module_losses = _train(make_model(arch), zo2=False, perturbation_scope="module")
    assert engine.scope == "module"
    assert module_losses == unit_losses
    assert torch.equal(module, unit)


@pytest.mark.parametrize("config", [dict(storage_dtype="bfloat16", write_back_every=2),
                                    dict(noise="rademacher", num_directions=2), dict(num_slots=1),
                                    dict(num_slots=3, storage_dtype="float16")])
def test_offloaded_module_scope_equals_resident_unit_scope(config):
    batches = [[make_batch(seed=s, batch=2), make_batch(seed=s + 10, batch=3)] for s in range(3)]  # micro-batches
    shared = {k: v for k, v in config.items() if k in ("storage_dtype", "noise", "num_directions")}
    _, resident, resident_losses = _train(make_model("llama-tied", num_hidden_layers=3), batches=batches,
                                          zo2=False, perturbation_scope="unit", **shared)
    engine, offloaded, offloaded_losses = _train(make_model("llama-tied", num_hidden_layers=3), batches=batches,
                                                 perturbation_scope="module", **config)
    assert engine.scope == "module" and any(u.offloaded for u in engine.units)
    assert offloaded_losses == resident_losses
    assert torch.equal(offloaded, resident)


@pytest.mark.parametrize("head", ["seq-cls", "qa"])
def test_module_scope_serves_task_heads(head):
    batches = [make_batch(head, seed=s) for s in range(2)]
    _, unit, _ = _train(make_model("opt", head=head), batches=batches, zo2=False)
    engine, module, _ = _train(make_model("opt", head=head), batches=batches, zo2=True, perturbation_scope="module")
    assert engine.scope == "module" and any(u.offloaded for u in engine.units)
    assert torch.equal(module, unit)


def test_auto_picks_module_scope_only_where_blocks_stream_to_a_gpu():
    """On a CPU working device generating z dominates a step, so auto keeps unit scope (z once per walk);
    tests/test_cuda.py checks that auto picks module scope when blocks stream to a GPU."""
    assert ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", zo2=False)).scope == "unit"
    assert ZOEngine(make_model("llama"), ZOConfig(working_device="cpu")).scope == "unit"
    module = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", perturbation_scope="module"))
    assert module.scope == "module" and "perturbation scope: module" in module.describe()
    assert plan.resolve_scope(ZOConfig(working_device="cpu"), streams=True) == "module"  # plans assume a GPU
    assert plan.resolve_scope(ZOConfig(working_device="cpu"), streams=True, accelerator=False) == "unit"
    assert plan.resolve_scope(ZOConfig(working_device="cpu"), streams=False) == "unit"


def _read_gate_weight_directly(model):
    """Make every MLP read its gate projection's weight itself, without calling that module (as some
    fused-projection code does): module scope cannot perturb such a read where it happens."""
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.forward = lambda x, mlp=mlp: mlp.down_proj(
            mlp.act_fn(nn.functional.linear(x, mlp.gate_proj.weight)) * mlp.up_proj(x))
    return model


def test_a_model_reading_matrices_outside_their_modules_is_perturbed_per_unit():
    assert find_partition(make_model("llama")).matrices_read_by_owner
    assert not find_partition(_read_gate_weight_directly(make_model("llama"))).matrices_read_by_owner
    with pytest.raises(UnsupportedModelError, match="perturbation_scope='module'"):
        ZOEngine(_read_gate_weight_directly(make_model("llama")),
                 ZOConfig(working_device="cpu", perturbation_scope="module"))
    engine, offloaded, _ = _train(_read_gate_weight_directly(make_model("llama")))
    assert engine.scope == "unit"
    assert plan.resolve_scope(engine.config, streams=True, module_scope_ok=False) == "unit"
    _, resident, _ = _train(_read_gate_weight_directly(make_model("llama")), zo2=False)
    assert torch.equal(offloaded, resident)
    _, plain, _ = _train(make_model("llama"), zo2=False)
    assert torch.equal(plain, resident)  # the direct read is the same function, perturbed the same way


def test_detach_removes_the_module_hooks():
    model = make_model("llama")
    engine = ZOEngine(model, ZOConfig(working_device="cpu", perturbation_scope="module"))
    engine.step(make_batch())
    assert any(m._forward_pre_hooks for m in model.modules())
    detached = engine.detach()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in detached.modules())


def _units(count: int, size: int) -> list[Unit]:
    return [Unit(index=i, name=f"block.{i}", params=[], master=torch.full((size,), float(i)), offloaded=True,
                 n_decay=0) for i in range(count)]


def test_the_scheduler_prefetches_while_a_unit_holds_its_slot_and_evicts_for_an_unexpected_one():
    units = _units(4, 8)
    scheduler = TransferScheduler(units, SlotPool(2, 8 * 4, torch.device("cpu")), torch.device("cpu"))
    scheduler.restart()
    assert torch.equal(scheduler.acquire(units[0]), units[0].master)
    assert set(scheduler._inflight) == {0, 1}  # block 1 uploads while block 0 still holds its slot
    assert torch.equal(scheduler.acquire(units[3]), units[3].master)  # out of order: block 1's slot is taken
    assert set(scheduler._inflight) == {0, 3}
    scheduler.release(units[0])
    scheduler.release(units[3])
    assert torch.equal(scheduler.acquire(units[1]), units[1].master)  # uploaded again when its turn came
    assert torch.equal(scheduler.acquire(units[2]), units[2].master)
    with pytest.raises(RuntimeError, match="num_slots"):
        scheduler.acquire(units[0])


def test_module_scope_lowers_the_peak_memory_of_a_step():
    """Counted in bytes of live tensors a step allocates (the working device is the CPU here), so the same
    on every machine: unit scope writes both perturbed copies of a block, module scope one weight matrix
    (a quarter of a LLaMA block: the MLP's h x 4h) at a time. Both also hold the step's activations and the
    noise generator's temporaries (one chunk), the same in both scopes. The copies come from a pool that
    later steps reuse: the first step allocates them, the second does not."""
    first, second = {}, {}
    for scope in ("unit", "module"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048,
                                             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8))
        block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
        engine = ZOEngine(model, ZOConfig(working_device="cpu", zo2=False, perturbation_scope=scope))
        ids = torch.randint(0, 512, (1, 16))
        for peaks in (first, second):  # the second step also applies the first one's update
            with live_tensor_bytes() as live:
                engine.step({"input_ids": ids, "labels": ids})
            peaks[scope] = live.peak
    assert first["unit"] >= 2 * block, (first, block)
    assert first["module"] <= first["unit"] - 1.5 * block, (first, block)  # saves two copies less one matrix
    assert second["unit"] <= first["unit"] - 1.5 * block, (first, second, block)  # the copies are reused
