"""zo2.persist.compat: the private parts of transformers and torch the streaming load relies on still behave as
it expects (an upgrade that changes them fails here first)."""
import pytest
import torch
from tiny import make_config, make_model
from transformers import AutoModelForCausalLM

from zo2.persist.compat import (
    UnsupportedCheckpointError,
    build_on_meta,
    checkpoint_names,
    initialize_missing_buffers,
    is_persistent,
)


def test_build_on_meta_allocates_nothing_and_ties_weights():
    model = build_on_meta(AutoModelForCausalLM, make_config("llama-tied"), torch.bfloat16)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    concrete = build_on_meta(type(make_model("opt")), make_config("opt"), torch.float32)  # a model class
    assert all(p.is_meta for p in concrete.parameters())


def test_checkpoint_keys_map_through_transformers_renamings():
    llama = make_model("llama")
    keys = list(llama.state_dict())
    assert checkpoint_names(llama, keys) == {key: key for key in keys}
    neox = make_model("gpt_neox")
    names = checkpoint_names(neox, ["embed_out.weight", "gpt_neox.embed_in.weight"])
    assert names == {"lm_head.weight": "embed_out.weight", "gpt_neox.embed_in.weight": "gpt_neox.embed_in.weight"}


def test_keys_transformers_would_convert_are_refused():
    with pytest.raises(UnsupportedCheckpointError, match="converted by transformers on load"):
        checkpoint_names(make_model("mixtral"), ["model.layers.0.block_sparse_moe.experts.0.w1.weight"])


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi"])
def test_missing_buffers_get_the_values_a_normal_construction_gives(arch):
    reference = make_model(arch)
    model = build_on_meta(AutoModelForCausalLM, make_config(arch), torch.float32)
    initialize_missing_buffers(model, loaded=set())
    expected, built = dict(reference.named_buffers()), dict(model.named_buffers())
    assert list(built) == list(expected) and expected  # the same buffers, in the same order, and some to check
    for name, buffer in built.items():
        assert buffer.device.type == "cpu" and torch.equal(buffer, expected[name]), name
        assert is_persistent(model, name) == (name in reference.state_dict())
    model.model.register_buffer("saved", torch.zeros(1))  # persistent, unlike the buffers above
    assert is_persistent(model, "model.saved")


def test_a_buffer_no_initialisation_sets_is_refused():
    model = build_on_meta(AutoModelForCausalLM, make_config("llama"), torch.float32)
    model.model.layers[0].register_buffer("scale", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(UnsupportedCheckpointError, match="'model.layers.0.scale' is not in the checkpoint"):
        initialize_missing_buffers(model, loaded=set())
