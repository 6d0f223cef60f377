"""Placement under a memory budget, and the plan's predictions, before anything is allocated."""
import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOConfigError, ZOEngine
from zo2.plan import (
    BudgetError,
    make_plan,
    meta_model,
    model_sizes,
    opt_config,
    perturbed_bytes,
    resident_block_count,
    working_bytes,
)


def _unit_bytes(engine):
    return [u.master.numel() * u.master.element_size() for u in engine.units]


@pytest.mark.parametrize("arch", ["opt", "llama-tied", "gpt2"])
def test_plan_predicts_the_engines_weight_bytes_exactly(arch):
    config = ZOConfig(working_device="cpu", storage_dtype="bfloat16")
    predicted = make_plan(make_model(arch), config, batch_size=2, seq_len=8)
    engine = ZOEngine(make_model(arch), config)
    sizes = _unit_bytes(engine)
    assert predicted.weights_bytes == sum(sizes)
    assert predicted.host_bytes == sum(sizes[1:-1]) == predicted.upload_bytes == predicted.download_bytes
    assert predicted.resident_blocks == 0


def test_budget_keeps_the_leading_blocks_that_fit_resident():
    model = make_model("llama", num_hidden_layers=6)
    budget = working_bytes(model_sizes(model), range(3, 6), 2, "unit")  # three resident, three streamed, two slots
    engine = ZOEngine(model, ZOConfig(working_device="cpu", gpu_memory_budget=budget))
    assert [u.offloaded for u in engine.units[1:-1]] == [False] * 3 + [True] * 3
    assert make_plan(make_model("llama", num_hidden_layers=6),
                     ZOConfig(working_device="cpu", gpu_memory_budget=budget, perturbation_scope="unit")
                     ).resident_blocks == 3
    one_less = ZOEngine(make_model("llama", num_hidden_layers=6), ZOConfig(working_device="cpu", gpu_memory_budget=budget - 1))
    assert sum(not u.offloaded for u in one_less.units[1:-1]) < 3
    engine_all = ZOEngine(make_model("llama", num_hidden_layers=6), ZOConfig(working_device="cpu", gpu_memory_budget="1GB"))
    assert not any(u.offloaded for u in engine_all.units)


def test_budget_placement_trains_like_resident():
    batch = make_batch()
    budget = working_bytes(model_sizes(make_model("llama", num_hidden_layers=4)), range(1, 4), 2, "unit")
    budgeted = ZOEngine(make_model("llama", num_hidden_layers=4), ZOConfig(working_device="cpu", lr=1e-2,
                                                                            gpu_memory_budget=budget))
    resident = ZOEngine(make_model("llama", num_hidden_layers=4), ZOConfig(working_device="cpu", lr=1e-2, zo2=False))
    assert any(u.offloaded for u in budgeted.units) and not all(u.offloaded for u in budgeted.units[1:-1])
    for _ in range(3):
        assert budgeted.step(batch) == resident.step(batch)
    assert torch.equal(masters(budgeted), masters(resident))


def test_too_small_a_budget_is_a_clear_error():
    with pytest.raises(BudgetError, match="gpu_memory_budget"):
        resident_block_count(model_sizes(make_model("llama")), 50, ZOConfig(working_device="cpu"))
    with pytest.raises(BudgetError, match="below"):
        ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", gpu_memory_budget="1KB"))
    with pytest.raises(ZOConfigError, match="gpu_memory_budget"):
        ZOConfig(gpu_memory_budget="lots")


def test_plan_of_a_175b_shape_allocates_nothing():
    model = meta_model("opt-175b", torch.float16)
    assert all(p.is_meta for p in model.parameters())
    plan = make_plan(model, ZOConfig(working_device="cpu"), batch_size=1, seq_len=2048)
    assert plan.weights_bytes == pytest.approx(2 * 175e9, rel=0.02)
    assert plan.num_blocks == 96 and plan.resident_blocks == 0
    assert plan.transfer_floor_s > plan.compute_floor_s  # streaming 175B over PCIe is transfer-bound
    skipping = make_plan(model, ZOConfig(working_device="cpu", write_back_every=4), batch_size=1, seq_len=2048)
    assert skipping.download_bytes * 4 == pytest.approx(plan.download_bytes, rel=1e-6)
    assert skipping.transfer_floor_s < plan.transfer_floor_s
    assert "floor: step" in plan.describe()


def test_reference_shapes_cut_in_depth():
    assert opt_config("66b", depth=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="unknown OPT size"):
        opt_config("7b")


def test_plan_command_prints_the_table_and_json(capsys):
    from zo2.cli.main import main
    assert main(["plan", "--model", "opt-1.3b", "--gpu-memory-budget", "2GB", "--write-back-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "blocks resident / streamed" in out and "floor: step" in out
    assert main(["plan", "--model", "opt-125m", "--json", "--no-zo2"]) == 0
    assert '"resident_blocks": 12' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "opt-1.3b", "--gpu-memory-budget", "1KB"])
    assert exit_info.value.code == 2 and "below" in capsys.readouterr().err


def test_module_scope_needs_less_memory_and_places_more_blocks():
    """Module scope holds one module's matrices perturbed instead of both copies of whole units, so the
    same budget keeps more blocks resident (what ``auto`` picks once anything streams to a GPU)."""
    model = make_model("llama-tied", num_hidden_layers=6)
    sizes = model_sizes(model)
    matrices = max(p.numel() * 4 for p in model.parameters() if p.dim() >= 2)
    assert sizes.module_matrices == matrices  # the tied embedding is the largest matrix here
    assert perturbed_bytes(sizes, "module") < perturbed_bytes(sizes, "unit") / 2
    budget = working_bytes(sizes, range(3, 6), 2, "module")
    placed = {scope: make_plan(model, ZOConfig(working_device="cpu", gpu_memory_budget=budget,
                                                perturbation_scope=scope)).resident_blocks
              for scope in ("unit", "module", "auto")}
    assert placed["module"] == placed["auto"] == 3 > placed["unit"]
    engine = ZOEngine(make_model("llama-tied", num_hidden_layers=6),
                      ZOConfig(working_device="cpu", gpu_memory_budget=budget, perturbation_scope="module"))
    assert engine.scope == "module" and sum(not u.offloaded for u in engine.units[1:-1]) == 3


def test_budgets_place_blocks_on_the_device_in_host_memory_and_on_disk():
    model = meta_model("opt-13b", torch.float16)
    disk = dict(working_device="cpu", storage_dtype="float16", offloading_device="disk", offload_dir="unused",
                gpu_memory_budget="12GB")
    everything_on_disk = make_plan(model, ZOConfig(**disk))
    assert everything_on_disk.disk_blocks == everything_on_disk.num_blocks - everything_on_disk.resident_blocks > 0
    split = make_plan(model, ZOConfig(**disk, host_memory_budget="8GB"))
    assert split.resident_blocks == everything_on_disk.resident_blocks
    in_host = split.num_blocks - split.resident_blocks - split.disk_blocks
    block = split.weights_bytes / split.num_blocks  # about one block (the embedding is a small part)
    assert in_host > 0 and split.disk_blocks > 0 and 8e9 - 1.5 * block < split.host_bytes <= 8e9
    assert split.disk_read_bytes == split.disk_bytes == split.disk_write_bytes
    assert split.disk_floor_s > 0 and split.step_floor_s >= split.disk_floor_s
    skipping = make_plan(model, ZOConfig(**disk, host_memory_budget="8GB", write_back_every=4))
    assert skipping.disk_write_bytes * 4 == pytest.approx(split.disk_write_bytes, rel=1e-6)
    assert "blocks on working device / host / disk" in split.describe()
    with pytest.raises(BudgetError, match="host_memory_budget"):
        make_plan(model, ZOConfig(**disk, host_memory_budget="100MB"))
    with pytest.raises(BudgetError, match="offloading_device='disk'"):
        make_plan(model, ZOConfig(working_device="cpu", storage_dtype="float16", host_memory_budget="8GB"))


def test_plan_command_shows_disk_placement(capsys):
    from zo2.cli.main import main
    assert main(["plan", "--model", "opt-30b", "--offloading-device", "disk", "--host-memory-budget", "16GB",
                 "--gpu-memory-budget", "20GB", "--disk-read-gbps", "3"]) == 0
    out = capsys.readouterr().out
    assert "disk per step: read / written" in out and "floor: disk" in out
