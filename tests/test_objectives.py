"""Any objective: per-example losses or (sum, count) per part, without autograd; plain PyTorch models."""
import importlib.util
import pathlib

import pytest
import torch
from tiny import make_batch, make_model, masters
from torch.nn import functional as F

import zo2
from zo2 import ZOConfig, ZOEngine, objective

CONFIG = dict(working_device="cpu", lr=1e-2, eps=1e-3)
_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "plain_pytorch_model.py"


def _example():
    spec = importlib.util.spec_from_file_location("plain_pytorch_model", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@objective(targets=("labels",))
def token_sum(outputs, batch):
    """The causal-LM loss as (sum, count): must reproduce the built-in task loss exactly."""
    logits, labels = outputs["logits"], batch["labels"]
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return total.double(), (targets != -100).sum()


def _counted(chosen, calls: list):
    """``chosen`` (an objective), counting its calls in ``calls``: an engine that ignored it would not call it."""
    return objective(lambda outputs, batch: calls.append(1) or chosen.fn(outputs, batch), targets=chosen.targets)


def test_a_sum_count_objective_reproduces_the_task_loss_bit_for_bit():
    calls = []
    default = ZOEngine(make_model("llama"), ZOConfig(**CONFIG))
    custom = ZOEngine(make_model("llama"), ZOConfig(**CONFIG), objective=_counted(token_sum, calls))
    for t in range(3):
        assert default.step(make_batch(seed=t)).losses == custom.step(make_batch(seed=t)).losses
    assert torch.equal(masters(default), masters(custom))
    assert calls  # the losses above were the objective's


def test_a_non_differentiable_per_example_objective_trains():
    """0-1 error of the next-token prediction at the last position, per example: no gradient exists."""
    @objective(targets=("labels",))
    def error_rate(outputs, batch):
        predicted = outputs["logits"][:, -2].argmax(dim=-1)
        return (predicted != batch["labels"][:, -1]).float()

    config = ZOConfig(**{**CONFIG, "lr": 1e-3, "eps": 1.0})  # eps large enough to flip predictions
    engine = ZOEngine(make_model("gpt2"), config, objective=error_rate)
    before = masters(engine).clone()
    results = [engine.step(make_batch(seed=t, batch=8)) for t in range(4)]
    assert all(0.0 <= loss <= 1.0 for r in results for loss in r.losses)
    assert all(loss * 8 == round(loss * 8) for r in results for loss in r.losses)  # a count of errors / 8
    assert any(r.projected_grad != 0 for r in results)
    assert not torch.equal(masters(engine), before)


def test_step_can_override_the_engine_objective_and_bad_returns_are_explained():
    engine = ZOEngine(make_model("llama"), ZOConfig(**CONFIG))
    plain = ZOEngine(make_model("llama"), ZOConfig(**CONFIG))
    calls = []
    assert engine.step(make_batch(), objective=_counted(token_sum, calls)).losses == plain.step(make_batch()).losses
    assert calls  # the step's losses were the override's
    with pytest.raises(TypeError, match="returns a 1-D tensor of per-example losses or a tuple"):
        engine.step(make_batch(), objective=lambda out, batch: out["logits"].mean())


def test_a_plain_pytorch_model_trains_offloaded_as_resident_with_targets_the_model_never_sees():
    example = _example()
    text = torch.tensor([ord(c) % 29 for c in example.TEXT])
    batches = example.batches(text, size=4, length=16, seed=0)
    steps = [dict(next(batches), notes=["not a tensor"] * 4) for _ in range(3)]
    read = objective(example.next_token_loss.fn, targets=("targets", "notes"))

    def train(offload: bool, scope: str = "unit"):
        torch.manual_seed(0)
        model = example.TinyGPT(29, width=32, depth=3, heads=2, context=16)
        engine = ZOEngine(model, ZOConfig(**CONFIG, zo2=offload, perturbation_scope=scope), objective=read,
                          probe_inputs={"idx": torch.zeros(1, 4, dtype=torch.long)})
        results = [engine.step(batch) for batch in steps]
        return engine, results

    resident, expected = train(False)
    torch.manual_seed(0)
    untrained = masters(ZOEngine(example.TinyGPT(29, width=32, depth=3, heads=2, context=16), ZOConfig(**CONFIG),
                                 probe_inputs={"idx": torch.zeros(1, 4, dtype=torch.long)}))
    assert not torch.equal(masters(resident), untrained)  # the steps trained
    for scope in ("unit", "module"):
        offloaded, results = train(True, scope)
        assert any(u.offloaded for u in offloaded.units)
        assert [r.losses for r in results] == [r.losses for r in expected]
        assert torch.equal(masters(offloaded), masters(resident))
    assert [u.name for u in resident.units] == ["embedding", "block.0", "block.1", "block.2", "head"]
    logits = resident.forward(idx=steps[0]["idx"])
    assert logits.shape == (4, 16, 29)


def test_a_plain_model_without_probe_inputs_is_told_what_to_pass():
    example = _example()
    with pytest.raises(zo2.UnsupportedModelError, match="pass probe_inputs"):
        ZOEngine(example.TinyGPT(29, width=16, depth=2, heads=2, context=8), ZOConfig(**CONFIG))


def test_candidate_cross_entropy_is_the_same_in_both_batch_layouts():
    """One row per example (single-token candidates at the last real token) == one row per candidate."""
    model = make_model("llama").eval()
    prompts = make_batch(batch=3, length=6, padded=False)
    candidates = torch.tensor([[5, 9, 17]])
    label = torch.tensor([0, 2, 1])
    fast = {"input_ids": prompts["input_ids"], "attention_mask": prompts["attention_mask"],
            "candidate_tokens": candidates, "candidate_label": label}
    rows = torch.cat([torch.cat((p.repeat(3, 1), candidates.T), dim=1) for p in prompts["input_ids"]])
    labels = torch.full_like(rows, -100)
    labels[:, -1] = rows[:, -1]
    slow = {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": labels, "candidate_label": label}
    with torch.no_grad():
        one = zo2.candidate_cross_entropy(model(input_ids=fast["input_ids"], attention_mask=fast["attention_mask"]),
                                          fast)
        per_candidate = zo2.candidate_cross_entropy(model(input_ids=rows, attention_mask=slow["attention_mask"]),
                                                    slow)
    torch.testing.assert_close(one, per_candidate, rtol=1e-6, atol=1e-6)
    assert one.shape == (3,) and (one > 0).all()
    engine = ZOEngine(make_model("llama"), ZOConfig(**CONFIG), objective=zo2.candidate_cross_entropy)
    result = engine.step(fast)
    assert len(result.losses) == 2 and all(r > 0 for r in result.losses)
