"""Offloaded and resident training give bitwise identical masters (invariant 1 of docs/design.md)."""
import pytest
import torch
from tiny import ARCHS, make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine

STEPS = 10


def _train(model, batch, **config):
    engine = ZOEngine(model, ZOConfig(working_device="cpu", lr=1e-2, eps=1e-3, weight_decay=0.1, **config))
    assert any(u.offloaded for u in engine.units) == config["zo2"]  # an offloaded run streams some block
    results = [engine.step(batch) for _ in range(STEPS)]
    return masters(engine), results


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_offloaded_equals_resident_after_ten_steps(arch):
    batch = make_batch()
    resident, res_steps = _train(make_model(arch), batch, zo2=False)
    offloaded, off_steps = _train(make_model(arch), batch, zo2=True)
    assert torch.equal(resident, offloaded)
    assert [r.projected_grad for r in res_steps] == [r.projected_grad for r in off_steps]
    assert not torch.equal(resident, masters(ZOEngine(make_model(arch), ZOConfig(working_device="cpu"))))


@pytest.mark.parametrize("head", ["seq-cls", "qa"])
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_offloaded_equals_resident_for_task_heads(arch, head):
    batch = make_batch(head)
    resident, _ = _train(make_model(arch, head=head), batch, zo2=False)
    offloaded, _ = _train(make_model(arch, head=head), batch, zo2=True)
    assert torch.equal(resident, offloaded)


@pytest.mark.parametrize("config", [dict(num_slots=1), dict(num_slots=3), dict(offloading_blocks=[1]),
                                    dict(noise="rademacher"), dict(storage_dtype="bfloat16"),
                                    dict(write_back_every=3), dict(write_back_every=4, storage_dtype="float16"),
                                    dict(write_back_every=2, num_directions=2), dict(perturbation_scope="module"),
                                    dict(perturbation_scope="module", num_slots=1, write_back_every=2)])
def test_offload_settings_do_not_change_the_result(config):
    batch = make_batch()
    extra = {k: v for k, v in config.items() if k in ("noise", "storage_dtype", "num_directions")}
    resident, _ = _train(make_model("llama", num_hidden_layers=4), batch, zo2=False, **extra)
    offloaded, _ = _train(make_model("llama", num_hidden_layers=4), batch, zo2=True, **config)
    assert torch.equal(resident, offloaded)


def _inside(pointer: int, buffer: torch.Tensor) -> bool:
    return buffer.data_ptr() <= pointer < buffer.data_ptr() + buffer.nbytes


def test_offloaded_masters_live_on_the_offloading_device_between_steps():
    """Both devices are the CPU here, so where a block's weights are read tells offloaded from resident: an
    offloaded block's forward reads a copy in a working-device slot, a resident block reads its master in
    place; between steps the offloaded block's parameters are views of its master again."""
    model = make_model("llama")
    engine = ZOEngine(model, ZOConfig(working_device="cpu", offloading_blocks=[0]))
    block, resident = engine.units[1], engine.units[2]
    assert block.offloaded and not resident.offloaded
    engine.step(make_batch())
    assert engine.bytes_moved() == (block.master.nbytes, 0)  # uploaded once; its update waits for the next walk
    assert block.master.device == torch.device(engine.config.offloading_device)
    assert all(_inside(p.data_ptr(), block.master) for p in block.params)
    read = {}  # block index -> where its down projection's weight was read during the forward

    def record(index):
        def hook(module, args):
            read[index] = module.weight.data_ptr()
        return hook

    for index, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_pre_hook(record(index))
    engine.forward(**make_batch())
    assert not _inside(read[0], block.master)  # streamed: read from its slot
    assert _inside(read[1], resident.master)  # read in place
    assert all(_inside(p.data_ptr(), block.master) for p in block.params)  # back on its master afterwards


@pytest.mark.parametrize("zo2", [False, True])
def test_a_step_interrupted_mid_walk_leaves_a_consistent_engine(zo2):
    """An exception inside the forward (e.g. Ctrl-C in block 1) records no update; retrying the step
    ends exactly where an uninterrupted run ends."""
    batch = make_batch()
    straight = ZOEngine(make_model("llama", num_hidden_layers=3), ZOConfig(working_device="cpu", zo2=zo2, lr=1e-2))
    for _ in range(6):
        straight.step(batch)
    model = make_model("llama", num_hidden_layers=3)
    engine = ZOEngine(model, ZOConfig(working_device="cpu", zo2=zo2, lr=1e-2))
    for _ in range(3):
        engine.step(batch)

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.step(batch)
    handle.remove()
    assert engine.step_count == 3 and len(engine.history) == 3
    assert all(p.data_ptr() in range(u.master.data_ptr(), u.master.data_ptr() + u.master.nbytes)
               for u in engine.units for p in u.params)
    for _ in range(3):
        engine.step(batch)
    assert torch.equal(masters(engine), masters(straight))


def test_skipped_write_backs_let_the_host_master_lag_until_due_or_flushed():
    engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", lr=1e-2, write_back_every=3))
    block = engine.units[1]
    for _ in range(3):
        engine.step(make_batch())
    # steps 1-2 replayed updates on upload, wrote nothing
    assert block.offloaded and engine.log.applied(block.index) == 0
    engine.step(make_batch())
    assert engine.log.applied(block.index) == 3  # the fourth walk carried three pending updates: due, written back
    engine.step(make_batch())
    assert engine.log.applied(block.index) == 3
    engine.flush()
    assert engine.log.applied(block.index) == len(engine.history) == 5


def test_each_offloaded_block_crosses_once_up_and_once_down_per_step():
    """Calibration of a new batch shape streams nothing: it needs shapes, not weights."""
    engine = ZOEngine(make_model("llama", num_hidden_layers=3), ZOConfig(working_device="cpu", lr=1e-2))
    block_bytes = sum(u.master.numel() * u.master.element_size() for u in engine.units if u.offloaded)
    engine.step(make_batch())  # calibrates, then walks: one upload per block, nothing pending to write
    assert engine.bytes_moved() == (block_bytes, 0)
    engine.step(make_batch(batch=6))  # a new shape calibrates again; the walk writes step 1's update back
    assert engine.bytes_moved() == (2 * block_bytes, block_bytes)
    skipping = ZOEngine(make_model("llama", num_hidden_layers=3),
                        ZOConfig(working_device="cpu", lr=1e-2, write_back_every=2))
    for _ in range(5):
        skipping.step(make_batch())
    assert skipping.bytes_moved() == (5 * block_bytes, 2 * block_bytes)
