"""Every registered method keeps the engine's invariants (offloaded == resident, replay == training,
resume exact, parts split across processes == one process: invariants 1, 5, 3 and 4 of docs/design.md), and each
has its defining property tested."""
import json
import math
import statistics
from dataclasses import dataclass

import pytest
import torch
from test_directions import _threads_sum
from tiny import make_batch, make_model, masters

from zo2 import Update, ZOConfig, ZOConfigError, ZOEngine, replay
from zo2.methods import METHODS, Decision, Method, Part
from zo2.objectives.task_loss import causal_lm_loss
from zo2.updates import noise
from zo2.walk.role import Role

#: Small, quick settings per method (several directions, so the multi-direction paths run too).
SETTINGS = {"mezo-sgd": dict(num_directions=2), "fzoo": dict(num_directions=3, lr=1e-3),
            "sparse-mezo": dict(num_directions=2, method_options={"sparsity": 0.5}),
            "adamezo": dict(num_directions=2, lr=1e-3, method_options={"horizon": 3}),
            "meazo": dict(num_directions=2, lr=1e-3)}


def _config(method: str, **overrides) -> ZOConfig:
    values = dict(working_device="cpu", lr=1e-2, eps=1e-3, weight_decay=0.05, method=method)
    return ZOConfig(**{**values, **SETTINGS[method], **overrides})


def _train(method: str, steps: int = 4, arch: str = "llama", **overrides):
    engine = ZOEngine(make_model(arch, num_hidden_layers=3), _config(method, **overrides))
    results = [engine.step(make_batch(seed=t)) for t in range(steps)]
    return engine, results


def test_every_registered_method_is_tested_here():
    assert set(METHODS) == set(SETTINGS)
    for name, cls in METHODS.items():
        assert cls.name == name and cls.__module__.startswith("zo2.methods.")
        assert "arXiv" in (__import__(cls.__module__, fromlist=["_"]).__doc__ or "")  # cites its paper


@pytest.mark.parametrize("method", sorted(SETTINGS))
@pytest.mark.parametrize("offload", [dict(perturbation_scope="unit", write_back_every=2),
                                     dict(perturbation_scope="module", storage_dtype="bfloat16")])
def test_offloaded_equals_resident(method, offload):
    dtype = {k: v for k, v in offload.items() if k == "storage_dtype"}
    resident, res_steps = _train(method, zo2=False, **dtype)
    offloaded, off_steps = _train(method, zo2=True, **offload)
    assert any(u.offloaded for u in offloaded.units) and not any(u.offloaded for u in resident.units)
    assert [r.losses for r in res_steps] == [r.losses for r in off_steps]
    trained = masters(offloaded)
    assert torch.equal(masters(resident), trained)
    assert not torch.equal(trained, masters(ZOEngine(make_model("llama", num_hidden_layers=3), _config(method))))


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_replay_of_the_log_rebuilds_the_trained_weights(method):
    engine, _ = _train(method, storage_dtype="bfloat16")
    config = engine.config
    rebuilt = replay(make_model("llama", num_hidden_layers=3), engine.history, config)
    assert torch.equal(masters(rebuilt), masters(engine))


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_resume_from_a_flushed_state_equals_training_straight(method):
    straight, expected = _train(method, steps=6)
    first, _ = _train(method, steps=3)
    first.flush()
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    state = json.loads(json.dumps(first.state_dict()))
    model = make_model("llama", num_hidden_layers=3, seed=1)
    model.load_state_dict(weights)
    resumed = ZOEngine(model, _config(method))
    resumed.load_state_dict(state)
    assert [resumed.step(make_batch(seed=t)) for t in range(3, 6)] == expected[3:]
    assert torch.equal(masters(resumed), masters(straight))


def _roles(method: str) -> list[Role]:
    if METHODS[method].two_sided:
        return [Role(sides=("plus",)), Role(sides=("minus",))]
    return [Role(directions=(0,)), Role(directions=(1, 2))]  # the clean part goes with direction 0


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_parts_shared_out_between_processes_equal_one_process(method):
    import threading

    config = _config(method)
    alone = ZOEngine(make_model("llama"), config)
    expected = [alone.step(make_batch(seed=t)) for t in range(2)]
    roles = _roles(method)
    reduce = _threads_sum(len(roles))
    engines = [ZOEngine(make_model("llama"), config, role=Role(r.directions, r.sides, reduce)) for r in roles]
    results: dict[int, list] = {}

    def run(k: int) -> None:
        results[k] = [engines[k].step(make_batch(seed=t)) for t in range(2)]
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(roles))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, engine in enumerate(engines):
        assert [r.updates for r in results[k]] == [r.updates for r in expected]
        assert torch.equal(masters(engine), masters(alone))


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_all_parts_in_one_walk_equal_one_part_per_walk(method):
    """K parts in one walk (the batch replicated K times) compute what K single-part walks compute."""
    _, together = _train(method, steps=2, zo2=True)
    engine, apart = _train(method, steps=2, zo2=True, max_parts_per_walk=1)
    assert [r.losses for r in together] == [r.losses for r in apart]
    _, pairs = _train(method, steps=2, zo2=True, max_parts_per_walk=2)
    assert [r.updates for r in pairs] == [r.updates for r in together]


@pytest.mark.parametrize("scope", ["unit", "module"])
def test_q_directions_in_one_walk_move_the_bytes_of_one_direction(scope):
    moved = {}
    for q, cap in ((1, None), (4, None), (4, 4)):
        engine = ZOEngine(make_model("llama", num_hidden_layers=3),
                          ZOConfig(working_device="cpu", num_directions=q, max_parts_per_walk=cap,
                                   perturbation_scope=scope))
        engine.step(make_batch())
        engine.step(make_batch())
        moved[q, cap] = engine.bytes_moved()
    assert moved[4, None] == moved[1, None]
    up, down = moved[4, 4]  # 8 parts, 4 per walk: two walks per step upload twice, write back once
    assert up == 2 * moved[1, None][0] and down == moved[1, None][1]


# ------------------------------------------------------------------------------------- fzoo
def test_fzoo_evaluates_theta_itself_and_normalises_the_step_by_the_spread_of_the_losses():
    engine, [result] = _train("fzoo", steps=1, zo2=False)
    batch = make_batch(seed=0)
    plain = ZOEngine(make_model("llama", num_hidden_layers=3), ZOConfig(working_device="cpu"))
    logits = plain.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert len(result.losses) == 4 and result.loss == result.losses[0]
    assert result.loss == causal_lm_loss(logits, batch["labels"]).item()  # the clean part is theta itself
    perturbed = result.losses[1:]
    sigma = statistics.stdev(perturbed)
    assert len(result.updates) == len(perturbed) == 3
    for update, loss in zip(result.updates, perturbed):
        assert update.projected_grad == pytest.approx((loss - result.loss) / 1e-3)
        assert update.lr == pytest.approx(1e-3 / (3 * sigma))
    method = engine.method
    seeds = [11, 12, 13]
    base = method.decide([2.0, 2.1, 1.9, 2.3], seeds, lr=0.1, eps=1e-3)
    scaled = method.decide([2.0, 2.0 + 5 * 0.1, 2.0 - 5 * 0.1, 2.0 + 5 * 0.3], seeds, lr=0.1, eps=1e-3)
    assert len(base.updates) == len(scaled.updates) == 3
    for a, b in zip(base.updates, scaled.updates):  # normalised SGD: scaling the loss differences changes nothing
        assert a.lr * a.projected_grad == pytest.approx(b.lr * b.projected_grad)


def test_fzoo_is_one_sided_and_refuses_perturbation_parallelism():
    with pytest.raises(ZOConfigError, match="perturbation_parallel"):
        ZOConfig(method="fzoo", perturbation_parallel=2, working_device="cpu")
    with pytest.raises(ZOConfigError, match="num_directions=1 is invalid"):
        ZOConfig(method="fzoo", num_directions=1, working_device="cpu")
    config = ZOConfig(method="fzoo", working_device="cpu")
    assert config.noise == "rademacher" and config.num_directions == 8


# ------------------------------------------------------------------------------ sparse-mezo
def test_sparse_mezo_never_touches_large_weights_and_trains_small_ones():
    model = make_model("llama", num_hidden_layers=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine = ZOEngine(model, _config("sparse-mezo", weight_decay=0.0, zo2=False))
    tau = {}  # id(matrix) -> its threshold (thresholds list each unit's matrices in layout order)
    for unit in engine.units:
        matrices = [p for p in unit.params if p.dim() >= 2]
        tau.update({id(p): t for p, t in zip(matrices, engine.method.thresholds[unit.index])})
    for t in range(3):
        engine.step(make_batch(seed=t))
    engine.flush()
    moved_small = 0
    for name, param in model.named_parameters():
        old, new = before[name], param.detach()
        if param.dim() < 2:
            continue
        large = old.abs() > tau[id(param)]
        assert torch.equal(new[large], old[large]), name  # masked out: never perturbed, never updated
        moved_small += int((new[~large] != old[~large]).sum())
    assert moved_small > 0


def test_sparse_mezo_perturbs_only_below_the_threshold():
    engine = ZOEngine(make_model("llama"), _config("sparse-mezo", zo2=False))
    unit = engine.units[1]
    master = unit.master.clone()
    [plus] = engine.method.update_and_perturb(unit.master.clone(), unit, range(0), 5, 1e-3, [1])
    changed = plus != master
    mask = engine.method.mask(master, unit, 0)
    assert torch.equal(changed & ~mask, torch.zeros_like(changed))
    assert changed[mask].float().mean() > 0.99  # Gaussian z is never exactly 0


# --------------------------------------------------------------------------------- adamezo
def test_adamezo_rebuilds_its_moments_from_the_last_h_steps_of_the_log():
    """The update equals Adam-style moments over the window, computed here from explicit z in float64."""
    h, beta1, beta2, delta, lr = 3, 0.9, 0.99, 1e-8, 1e-3
    config = _config("adamezo", zo2=False, weight_decay=0.0, num_directions=1, lr=lr,
                     method_options={"horizon": h, "beta1": beta1, "beta2": beta2, "delta": delta})
    engine = ZOEngine(make_model("llama"), config)
    unit = engine.units[1]
    start = unit.master.double().clone()
    results = [engine.step(make_batch(seed=t)) for t in range(5)]
    engine.flush()
    expected = start.clone()
    estimates = [r.updates[0].projected_grad * noise.generate("gaussian", r.seed, unit.index, 0, unit.numel).double()
                 for r in results]
    for t in range(5):
        window = range(max(0, t - h + 1), t + 1)
        m = (1 - beta1) * sum(beta1 ** (t - s) * estimates[s] for s in window)
        v = (1 - beta2) * sum(beta2 ** (t - s) * estimates[s] ** 2 for s in window)
        expected -= lr * m / torch.sqrt(v + delta)
    torch.testing.assert_close(unit.master.double(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(unit.master.double(), start)


# ----------------------------------------------------------------------------------- meazo
def test_meazo_divides_the_lr_by_the_root_of_a_bias_corrected_scalar_moment():
    engine, results = _train("meazo", steps=4, zo2=False)
    beta, v = 0.99, 0.0
    for t, result in enumerate(results, start=1):
        v = beta * v + (1 - beta) * result.projected_grad ** 2
        rate = 1e-3 / (math.sqrt(v / (1 - beta ** t)) + 1e-8)
        assert len(result.updates) == 2 and all(u.lr == pytest.approx(rate / 2) for u in result.updates)


# ------------------------------------------------------------------------------- plug-ins
@dataclass(frozen=True)
class _HalfOptions:
    scale: float = 0.5
    """Factor on MeZO's step."""


class _HalfMeZO(Method):
    """A test plug-in: MeZO's estimate, ``scale`` times its step."""

    name = "half-mezo"
    Options = _HalfOptions

    def decide(self, losses, seeds, lr, eps) -> Decision:
        plain = super().decide(losses, seeds, lr, eps)
        updates = tuple(Update(u.seed, u.projected_grad, u.lr * self.options.scale) for u in plain.updates)
        return Decision(updates, plain.loss, plain.loss_minus, plain.projected_grad)


def test_a_method_is_one_class_in_the_registry(monkeypatch):
    import zo2.config

    monkeypatch.setitem(METHODS, "half-mezo", _HalfMeZO)
    monkeypatch.setattr(zo2.config, "METHODS", tuple(METHODS))
    with pytest.raises(ZOConfigError, match="unknown option"):
        ZOConfig(method="half-mezo", method_options={"scal": 1.0}, working_device="cpu")
    half = ZOEngine(make_model("gpt2"), ZOConfig(method="half-mezo", working_device="cpu", lr=1e-2))
    plain = ZOEngine(make_model("gpt2"), ZOConfig(working_device="cpu", lr=1e-2))
    h, p = half.step(make_batch()), plain.step(make_batch())
    assert h.losses == p.losses and h.updates[0].lr == p.updates[0].lr * 0.5
    assert isinstance(half.parts()[0], Part)
