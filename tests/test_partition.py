"""Units are found generically: [embedding, blocks..., head] for any HF decoder, no per-family code."""
import pytest
import torch
from tiny import ARCHS, make_model
from torch import nn

from zo2 import UnsupportedModelError, ZOConfig, ZOEngine, find_partition


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_parameter_belongs_to_exactly_one_unit(arch):
    model = make_model(arch)
    all_params = {id(p) for p in model.parameters()}
    engine = ZOEngine(model, ZOConfig(working_device="cpu"))
    owned = [id(p) for unit in engine.units for p in unit.params]
    assert len(owned) == len(set(owned)) and set(owned) == all_params
    names = [u.name for u in engine.units]
    assert names[0] == "embedding" and names[-1] == "head"
    assert names[1:-1] == [f"block.{i}" for i in range(len(names) - 2)]
    assert engine.units[0].numel > 0 and all(u.numel > 0 for u in engine.units[1:-1])


@pytest.mark.parametrize("arch, tied", [("opt", True), ("gpt2", True), ("llama", False), ("llama-tied", True),
                                        ("gemma", True), ("phi", False)])
def test_tied_head_is_owned_by_the_embedding_unit(arch, tied):
    model = make_model(arch)
    head_weight = model.get_output_embeddings().weight
    assert (head_weight is model.get_input_embeddings().weight) == tied
    engine = ZOEngine(model, ZOConfig(working_device="cpu"))
    embedding, head = engine.units[0], engine.units[-1]
    assert any(p is head_weight for p in (embedding.params if tied else head.params))


@pytest.mark.parametrize("head", ["seq-cls", "qa"])
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_task_heads_land_in_the_head_unit(arch, head):
    model = make_model(arch, head=head)
    partition = find_partition(model)
    head_names = [m.name for m in partition.head]
    assert head_names and head_names[-1] in ("score", "qa_outputs")


def test_bloom_and_gpt2_extra_embedding_modules_are_found():
    bloom = find_partition(make_model("bloom"))
    assert [m.name for m in bloom.embedding] == ["transformer.word_embeddings", "transformer.word_embeddings_layernorm"]
    gpt2 = find_partition(make_model("gpt2"))
    assert [m.name for m in gpt2.embedding] == ["transformer.wte", "transformer.wpe"]


class _NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, input_ids=None, **kwargs):
        return self.proj(input_ids.float())


class _MiddleModule(nn.Module):
    """A parametrised module runs between the blocks: no unit order can describe it."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"vocab_size": 8})()
        self.embed = nn.Embedding(8, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.mid = nn.Linear(4, 4)

    def forward(self, input_ids=None, **kwargs):
        x = self.layers[0](self.embed(input_ids))
        return self.layers[1](self.mid(x))


def test_a_model_without_layers_gets_an_error_that_says_what_was_looked_for():
    with pytest.raises(UnsupportedModelError, match="looks for an nn.ModuleList of decoder layers"):
        find_partition(_NoLayers())


def test_a_module_between_blocks_is_refused():
    with pytest.raises(UnsupportedModelError, match="'mid' runs between or around the decoder layers"):
        find_partition(_MiddleModule())


def test_weight_decay_mask_is_the_matrix_prefix():
    engine = ZOEngine(make_model("opt"), ZOConfig(working_device="cpu"))
    for unit in engine.units:
        dims = [p.dim() for p in unit.params]
        first_small = next((i for i, d in enumerate(dims) if d < 2), len(dims))
        assert all(d < 2 for d in dims[first_small:])
        assert unit.n_decay == sum(p.numel() for p in unit.params if p.dim() >= 2)
        assert all(p.dim() >= 2 for p, off in zip(unit.params, unit.offsets) if off < unit.n_decay)


def test_parameters_are_views_of_the_flat_master():
    model = make_model("llama")
    engine = ZOEngine(model, ZOConfig(working_device="cpu"))
    for unit in engine.units:
        base = unit.master.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == base for p in unit.params)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in state.values())


class _BatchNormModel(_MiddleModule):
    def __init__(self):
        super().__init__()
        self.mid = nn.BatchNorm1d(4)


def test_batch_coupling_modules_are_refused():
    with pytest.raises(UnsupportedModelError, match="normalise across the batch"):
        find_partition(_BatchNormModel())
