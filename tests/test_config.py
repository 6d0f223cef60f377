"""Bad configurations raise ZOConfigError naming the field and what would work."""
import pytest
import torch
from tiny import make_model

from zo2 import ZOConfig, ZOConfigError, ZOEngine


@pytest.mark.parametrize("field, value, message", [
    ("eps", 0.0, "ZOConfig.eps=0.0 is invalid: expected a number > 0"),
    ("eps", -1e-3, "ZOConfig.eps"),
    ("lr", -1.0, "ZOConfig.lr"),
    ("lr", float("nan"), "ZOConfig.lr"),
    ("eps", float("inf"), "expected a finite number"),
    ("weight_decay", -0.1, "ZOConfig.weight_decay"),
    ("method", "adam", "ZOConfig.method='adam' is invalid: expected one of ['mezo-sgd', 'fzoo'"),
    ("noise", "uniform", "ZOConfig.noise='uniform' is invalid: expected one of ['gaussian', 'rademacher']"),
    ("working_device", "tpu", "ZOConfig.working_device='tpu' is invalid"),
    ("offloading_device", "disk?", "ZOConfig.offloading_device"),
    ("storage_dtype", "int8", "ZOConfig.storage_dtype='int8' is invalid: expected None or one of"),
    ("num_slots", 0, "ZOConfig.num_slots"),
    ("num_directions", 0, "ZOConfig.num_directions"),
    ("num_directions", 1.5, "ZOConfig.num_directions"),
    ("seed", -3, "ZOConfig.seed"),
    ("offloading_blocks", "0,1", "ZOConfig.offloading_blocks"),
    ("host_memory_budget", "plenty", "ZOConfig.host_memory_budget='plenty' is invalid"),
])
def test_bad_values_name_the_field(field, value, message):
    kwargs = {"working_device": "cpu", field: value}
    with pytest.raises(ZOConfigError) as raised:
        ZOConfig(**kwargs)
    assert message in str(raised.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ZOConfigError, match="asks for CUDA, but torch.cuda.is_available\\(\\) is False"):
        ZOConfig(working_device="cuda")


def test_documented_zo2_usage_is_accepted():
    cfg = ZOConfig(method="mezo-sgd", zo2=True, offloading_device="cpu", working_device="cpu", lr=1e-5)
    assert cfg.lr == 1e-5 and cfg.eps == 1e-3 and cfg.noise == "gaussian"
    assert ZOConfig(working_device="cpu", storage_dtype="bf16").storage_dtype == "bfloat16"


def test_offloading_block_out_of_range_names_the_model_size():
    model = make_model("llama")
    with pytest.raises(ZOConfigError, match=r"offloading_blocks=\[0, 5\] is invalid: expected indices in \[-2, 2\)"):
        ZOEngine(model, ZOConfig(working_device="cpu", offloading_blocks=[0, 5]))


def test_negative_offloading_blocks_count_from_the_end():
    engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", offloading_blocks=[-1]))
    assert [u.name for u in engine.units if u.offloaded] == ["block.1"]
    assert ZOConfig(working_device="cpu", zo2=False).offloaded_block_indices(4) == []


def test_disk_offload_needs_a_folder_and_excludes_what_cannot_stream_from_disk():
    with pytest.raises(ZOConfigError, match="ZOConfig.offload_dir=None is invalid"):
        ZOConfig(working_device="cpu", offloading_device="disk")
    with pytest.raises(ZOConfigError, match="sliced_transfers"):
        ZOConfig(working_device="cpu", offloading_device="disk", offload_dir="/x", sliced_transfers=True)
    with pytest.raises(ZOConfigError, match="sparse-mezo"):
        ZOConfig(working_device="cpu", offloading_device="disk", offload_dir="/x", method="sparse-mezo")
    config = ZOConfig(working_device="cpu", offloading_device="disk", offload_dir="/x", host_memory_budget="2GiB")
    assert config.host_memory_budget == 2 * 2**30 and config.offloads_to_disk
