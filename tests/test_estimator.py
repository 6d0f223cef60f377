"""The ZO estimate is unbiased (invariant 2 of docs/design.md), in float64 on a tiny model."""
import copy

import pytest
import torch
from tiny import make_batch, make_model

from zo2 import ZOConfig, ZOEngine
from zo2.updates import noise

SAMPLES = 400


def _autograd_gradient(reference, batch, engine):
    """d loss / d theta of ``reference`` (an untouched copy of the engine's model), in the unit layout."""
    loss = reference.eval()(**batch, use_cache=False).loss
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    by_name = dict(zip([n for n, _ in reference.named_parameters()], grads))
    names = {id(p): n for n, p in engine.model.named_parameters()}
    return torch.cat([by_name[names[id(p)]].reshape(-1) for unit in engine.units for p in unit.params])


def _z(engine, seed):
    return torch.cat([noise.generate(engine.config.noise, seed, u.index, 0, u.numel).double() for u in engine.units])


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_mean_of_g_z_points_along_the_gradient(kind):
    model = make_model("llama", dtype=torch.float64)
    batch = make_batch(padded=False)
    reference = copy.deepcopy(model)
    engine = ZOEngine(model, ZOConfig(working_device="cpu", lr=0.0, eps=1e-4, noise=kind))
    grad = _autograd_gradient(reference, batch, engine)
    estimates = []
    for _ in range(SAMPLES):  # lr = 0: the weights never move, each step is one fresh direction
        result = engine.step(batch)
        estimates.append(result.projected_grad * _z(engine, result.seed))
    estimates = torch.stack(estimates)
    # Each sample's projection s = (g z) . grad / |grad|^2 has mean 1 and, z being N(0, I) or random
    # signs, variance ~2 (a chi-square with one degree of freedom): the mean of 400 samples is 1 +- 0.07.
    # A fixed window of 0.1 around 1 was 1.4 of those standard errors (seed 2 of the config fails it);
    # 5 standard errors of these very samples hold for any seed and still reject a sign error (-1) or a
    # factor of 2 (0.5 or 2).
    projections = estimates @ grad / torch.dot(grad, grad)
    standard_error = projections.std() / SAMPLES ** 0.5
    assert abs(projections.mean() - 1) < 5 * standard_error, \
        f"E[g z] . grad / |grad|^2 = {projections.mean():.3f} +- {standard_error:.3f}"

    def cosine(rows):
        mean = rows.mean(0)
        return float(torch.dot(mean, grad) / (mean.norm() * grad.norm()))

    # The cosine of a mean of n estimates with the gradient grows like sqrt(n / (n + d)) (d = 6736 weights
    # here; an unrelated direction gives 0 +- 1/sqrt(d) = 0.012): all 400 samples give ~0.24, each quarter
    # of them ~0.12, so "the whole beats every quarter" holds by ~7 of those deviations, as does "far
    # above an unrelated direction" (10/sqrt(d) = 0.12).
    quarters = [cosine(part) for part in estimates.chunk(4)]
    whole = cosine(estimates)
    assert whole > max(quarters) and whole > 10 / grad.numel() ** 0.5, (whole, quarters)
    # for one direction, g is the directional derivative along z up to O(eps^2)
    result = engine.step(batch)
    assert result.projected_grad == pytest.approx(float(torch.dot(grad, _z(engine, result.seed))), abs=1e-4)
