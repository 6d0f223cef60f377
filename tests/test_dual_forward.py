"""The one-walk dual forward reproduces two separate perturbed forwards, and the ZO step behaves."""
import copy

import pytest
import torch
from tiny import ARCHS, make_batch, make_model

from zo2 import ZOConfig, ZOEngine
from zo2.objectives.task_loss import causal_lm_loss
from zo2.updates import noise
from zo2.walk import batching


def _perturbed_copy(base, engine, seed, sign, eps):
    """``base`` with every parameter moved by sign * eps * z, z generated per parameter independently."""
    model = copy.deepcopy(base)
    names = {id(p): n for n, p in engine.model.named_parameters(remove_duplicate=False)}
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for unit in engine.units:
            for param, offset in zip(unit.params, unit.offsets):
                z = noise.generate(engine.config.noise, seed, unit.index, offset, param.numel()).view(param.shape)
                target = params[names[id(param)]]
                target.copy_(torch.add(target, z, alpha=sign * eps))  # the engine's op: one rounding
    return model.eval()


def _separate_losses(base, engine, batch, seed):
    losses = []
    for sign in (1, -1):
        model = _perturbed_copy(base, engine, seed, sign, engine.config.eps)
        with torch.no_grad():
            output = model(**batch, use_cache=False)  # the HF loss of the task heads, computed by the model
        is_causal = "labels" in batch and output.logits.dim() == 3
        losses.append(causal_lm_loss(output.logits, batch["labels"]).item() if is_causal else output.loss.item())
    return losses


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_dual_walk_equals_two_separate_forwards(arch):
    base = make_model(arch)
    batch = make_batch()
    engine = ZOEngine(copy.deepcopy(base), ZOConfig(working_device="cpu", eps=1e-2))
    result = engine.step(batch)
    assert [result.loss, result.loss_minus] == _separate_losses(base, engine, batch, result.seed)


@pytest.mark.parametrize("arch", ["opt", "llama", "bloom", "gpt2", "mixtral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_calibration_on_cut_sequences_serves_long_padded_batches(arch, side):
    """Calibration forwards keep 8 positions of each row (both ends, so padding stays in them): a batch of
    40 positions, padded on either side, still walks exactly like two separate forwards."""
    from zo2.walk import batching

    batch = make_batch(length=40, padded=False)
    pads = slice(0, 25) if side == "left" else slice(15, 40)
    batch["attention_mask"][0, pads] = 0
    batch["input_ids"][0, pads] = 0
    batch["labels"][0, pads] = -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    cut = batching.calibration_inputs(inputs, 4, torch.tensor([0, 1]))
    assert cut["input_ids"].shape == (2, batching.CALIBRATION_TOKENS) and (cut["attention_mask"][0] == 0).any()
    base = make_model(arch)
    engine = ZOEngine(copy.deepcopy(base), ZOConfig(working_device="cpu", eps=1e-2))
    result = engine.step(batch)
    assert [result.loss, result.loss_minus] == _separate_losses(base, engine, batch, result.seed)


def test_calibration_keeps_whole_rows_of_other_inputs():
    from zo2.walk import batching

    inputs = {"input_ids": torch.zeros(4, 40, dtype=torch.long), "attention_mask": torch.ones(4, 1, 40, 40)}
    assert batching.calibration_inputs(inputs, 4, torch.tensor([0, 1, 2]))["input_ids"].shape == (3, 40)


@pytest.mark.parametrize("head", ["seq-cls", "qa"])
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_dual_walk_equals_separate_forwards_for_task_heads(arch, head):
    base = make_model(arch, head=head)
    batch = make_batch(head)
    engine = ZOEngine(copy.deepcopy(base), ZOConfig(working_device="cpu", eps=1e-2))
    result = engine.step(batch)
    assert [result.loss, result.loss_minus] == _separate_losses(base, engine, batch, result.seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_lm_loss_is_the_hf_loss(dtype):
    model = make_model("llama", dtype=dtype).eval()
    batch = make_batch()
    with torch.no_grad():
        output = model(**batch, use_cache=False)
    assert causal_lm_loss(output.logits, batch["labels"]).item() == pytest.approx(output.loss.item(), rel=1e-6)


def test_the_causal_lm_loss_runs_in_chunks_of_positions(monkeypatch):
    """A chunk bound of a few positions (two and a half rows of logits) gives the loss of one pass."""
    from zo2.objectives import task_loss

    model = make_model("llama").eval()
    batch = make_batch()
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    whole = task_loss.causal_lm_terms(logits, batch["labels"])
    monkeypatch.setattr(task_loss, "LOSS_CHUNK", int(2.5 * logits.shape[-1]))
    chunked = task_loss.causal_lm_terms(logits, batch["labels"])
    assert chunked[1] == whole[1] == (batch["labels"][:, 1:] != -100).sum()
    assert chunked[0].item() == pytest.approx(whole[0].item(), rel=1e-6)


def test_projected_gradient_is_the_loss_difference_over_two_eps():
    engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", eps=1e-3))
    result = engine.step(make_batch())
    assert result.projected_grad == (result.loss - result.loss_minus) / 2e-3
    assert result.loss != result.loss_minus


def test_dropout_is_off_during_zo_forwards_whatever_the_model_mode():
    base = make_model("opt", dropout=0.5, attention_dropout=0.5)
    batch = make_batch()
    losses = []
    for training in (True, False):
        model = copy.deepcopy(base).train(training)
        engine = ZOEngine(model, ZOConfig(working_device="cpu", eps=1e-2))
        losses.append(engine.step(batch))
        assert model.training == training  # the mode is restored afterwards
    assert losses[0] == losses[1]
    assert [losses[0].loss, losses[0].loss_minus] == _separate_losses(base, engine, batch, losses[0].seed)


def test_a_seed_makes_a_run_reproducible_and_the_global_rng_is_untouched():
    batch = make_batch()
    runs = []
    for seed in (5, 5, 6):
        engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", lr=1e-2, seed=seed))
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        runs.append([engine.step(batch) for _ in range(3)])
        assert torch.equal(state, torch.get_rng_state())
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_missing_targets_are_explained():
    engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu"))
    with pytest.raises(ValueError, match="needs targets.*missing \\['labels'\\]"):
        engine.step({"input_ids": make_batch()["input_ids"]})


def test_non_finite_loss_records_no_update():
    engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu"))
    batch = make_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)  # nothing to predict: the mean loss is NaN
    with pytest.raises(FloatingPointError, match="no update was recorded"):
        engine.step(batch)
    assert engine.history == [] and engine.step_count == 0


def test_only_a_plain_bias_free_linear_writes_its_parts_in_place():
    """The LM head's parts write into one output (no concatenated copy of the logits) only when that is
    the same computation as the module's own forward."""
    head, x = torch.nn.Linear(8, 5, bias=False), torch.randn(4, 3, 8)
    with torch.no_grad():
        assert batching.writes_parts_in_place(head, head.forward, (x,), {})
        out = torch.empty(4, 3, 5)
        batching.linear_part_into(head, x, out)
        assert torch.equal(out, head(x))
        biased = torch.nn.Linear(8, 5)
        assert not batching.writes_parts_in_place(biased, biased.forward, (x,), {})
        assert not batching.writes_parts_in_place(head, lambda t: head(t) * 2, (x,), {})  # forward replaced
        assert not batching.writes_parts_in_place(head, head.forward, (x,), {"scale": 2})
    assert not batching.writes_parts_in_place(head, head.forward, (x,), {})  # autograd on: outputs need history
