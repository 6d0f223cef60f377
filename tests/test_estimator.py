"""The ZO estimate is unbiased (DESIGN invariant 2), in float64 on a tiny model."""
import copy

import pytest
import torch

from zo2 import ZOConfig, ZOEngine, noise
from conftest import make_batch, make_model

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
    mean = estimates.mean(0)
    scale = torch.dot(mean, grad) / torch.dot(grad, grad)
    assert abs(scale - 1) < 0.1, f"E[g z] . grad / |grad|^2 = {scale:.3f}"

    def cosine(n):
        m = estimates[:n].mean(0)
        return float(torch.dot(m, grad) / (m.norm() * grad.norm()))

    cosines = [cosine(n) for n in (10, 50, SAMPLES)]
    assert cosines[0] < cosines[1] < cosines[2], cosines
    # for one direction, g is the directional derivative along z up to O(eps^2)
    result = engine.step(batch)
    assert result.projected_grad == pytest.approx(float(torch.dot(grad, _z(engine, result.seed))), abs=1e-4)
