"""The documented ZO2 usage (zo_hf_init, zo_init, zo_train, zo_eval) and HF checkpoints."""
import pytest
import torch
from tiny import CORE_ARCHS, make_batch, make_config, make_model
from transformers import AutoModelForCausalLM, OPTForCausalLM, PreTrainedModel

from zo2 import ZOConfig, zo_hf_init
from zo2.objectives.task_loss import causal_lm_loss


@pytest.fixture
def opt_path(tmp_path):
    make_model("opt").save_pretrained(tmp_path / "opt")
    return tmp_path / "opt"


def test_documented_usage_trains_evaluates_and_saves(opt_path, tmp_path):
    cfg = ZOConfig(method="mezo-sgd", zo2=True, offloading_device="cpu", working_device="cpu", lr=1e-2)
    with zo_hf_init(cfg):
        model = OPTForCausalLM.from_pretrained(opt_path)
        model.zo_init(cfg)
    batch = make_batch()
    model.zo_train()
    losses = [model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
              for _ in range(3)]
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 for loss in losses)
    assert losses[-1].item() == pytest.approx(model.zo_last_step.loss, rel=1e-7)  # the +eps pass, as float32

    model.zo_eval()
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.save_pretrained(tmp_path / "trained")
    plain = OPTForCausalLM.from_pretrained(tmp_path / "trained").eval()
    assert not hasattr(plain, "zo_init")
    with torch.no_grad():
        reloaded = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(output.logits, reloaded.logits)
    base = OPTForCausalLM.from_pretrained(opt_path)
    assert not torch.equal(base.model.decoder.layers[0].fc1.weight, plain.model.decoder.layers[0].fc1.weight)


def test_save_pretrained_flushes_pending_updates(opt_path, tmp_path):
    cfg = ZOConfig(working_device="cpu", lr=1e-2)
    with zo_hf_init(cfg):
        model = OPTForCausalLM.from_pretrained(opt_path)
    model.zo_init(cfg)
    model.zo_train()
    batch = make_batch()
    model(**batch)
    model.save_pretrained(tmp_path / "saved")  # no zo_eval in between: the pending update must be applied
    saved = OPTForCausalLM.from_pretrained(tmp_path / "saved")
    model.zo_eval()
    assert torch.equal(saved.lm_head.weight, model.lm_head.weight.detach())
    assert all(model.zo_engine.log.applied(unit.index) == 1 for unit in model.zo_engine.units)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_zo_hf_init_works_for_auto_models_of_every_core_architecture(arch):
    """Built under zo_hf_init, the model trains (a call in training mode is one ZO step: it returns that
    step's +eps loss and the update changes the weights) and evaluates with the updated weights."""
    cfg = ZOConfig(working_device="cpu", lr=1e-2)
    with zo_hf_init(cfg):
        model = AutoModelForCausalLM.from_config(make_config(arch))
        model.zo_init(cfg)
    batch = make_batch()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.zo_eval()
    untrained = model(**inputs).logits
    model.zo_train()
    first = model(**batch)
    step = model.zo_last_step
    assert model.zo_engine.step_count == 1 and len(model.zo_engine.history) == 1
    # StepResult.loss is the +eps pass (tests/test_dual_forward.py checks it against a perturbed copy); the
    # returned tensor holds it in float32 (one rounding: 2**-24 relative), and the -eps pass differs by 2 eps g
    assert first.dim() == 0 and first.item() == pytest.approx(step.loss, rel=2**-24, abs=0)
    assert first.item() != pytest.approx(step.loss_minus, rel=2**-24, abs=0)
    model.zo_eval()
    output = model(**inputs)
    assert torch.isfinite(output.logits).all() and first > 0
    assert causal_lm_loss(output.logits, batch["labels"]).item() > 0
    assert not torch.equal(output.logits, untrained)  # the step's update reached the evaluated weights


def test_zo_hf_init_restores_transformers_even_on_error():
    original = PreTrainedModel.post_init
    with pytest.raises(RuntimeError, match="boom"):
        with zo_hf_init(ZOConfig(working_device="cpu")):
            assert PreTrainedModel.post_init is not original
            inside = make_model("llama")
            raise RuntimeError("boom")
    assert PreTrainedModel.post_init is original
    assert hasattr(inside, "zo_init")
    assert not hasattr(make_model("llama"), "zo_init")


def test_zo_methods_before_zo_init_explain_what_to_do():
    with zo_hf_init():
        model = make_model("llama")
    with pytest.raises(RuntimeError, match=r"call model.zo_init\(ZOConfig\(...\)\) before"):
        model.zo_train()
    model.zo_init(ZOConfig(working_device="cpu"))
    with pytest.raises(RuntimeError, match="already called"):
        model.zo_init(ZOConfig(working_device="cpu"))


def test_zo_eval_output_is_the_plain_model_output_with_current_weights():
    with zo_hf_init():
        model = make_model("gpt2")
    model.zo_init(ZOConfig(working_device="cpu", lr=1e-2))
    batch = make_batch()
    model.zo_train()
    model(**batch)
    model.zo_eval()
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    plain = make_model("gpt2")
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = plain.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(output.logits, expected.logits)


class _OnAnotherDevice(torch.Tensor):
    """A CPU tensor standing for one on another device: only ``.to(device)`` turns it into a plain tensor."""

    def to(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).to(*args, **kwargs)


def test_engine_forward_moves_inputs_and_skips_the_kv_cache_by_default():
    """The inputs and the working device are both the CPU here, so the inputs stand for tensors on another
    device (``_OnAnotherDevice``): the model's forward must receive every tensor argument, positional or
    keyword, as a plain tensor on the working device."""
    from zo2 import ZOEngine
    model = make_model("llama")
    received = []
    forward = model.forward

    def recording(*args, **kwargs):
        received.append((args, kwargs))
        return forward(*args, **kwargs)

    model.forward = recording  # the engine calls the model's forward
    engine = ZOEngine(model, ZOConfig(working_device="cpu"))
    batch = make_batch()
    ids, mask = (batch[k].as_subclass(_OnAnotherDevice) for k in ("input_ids", "attention_mask"))
    received.clear()
    output = engine.forward(ids, attention_mask=mask)
    [(args, kwargs)] = received
    for given, expected in ((args[0], batch["input_ids"]), (kwargs["attention_mask"], batch["attention_mask"])):
        assert type(given) is torch.Tensor and given.device == engine.device and torch.equal(given, expected)
    assert output.past_key_values is None
    assert engine.forward(input_ids=batch["input_ids"], use_cache=True).past_key_values is not None
