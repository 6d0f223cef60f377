"""Iterate averaging replayed from the update log equals the arithmetic mean of the stored iterates."""
import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine
from zo2.tuning import average_iterates

BATCH = make_batch(batch=4, length=8)
STEPS = 6


def _trained(method: str = "mezo-sgd", **config) -> tuple[ZOEngine, list[torch.Tensor]]:
    engine = ZOEngine(make_model("opt", dtype=torch.float64),
                      ZOConfig(working_device="cpu", method=method, lr=1e-3 if method == "mezo-sgd" else None,
                               seed=2, **config))
    iterates = [masters(engine)]
    for _ in range(STEPS):
        engine.step(BATCH)
        iterates.append(masters(engine))
    return engine, iterates


@pytest.mark.parametrize("method, last, k", [("mezo-sgd", 0.5, 3), ("mezo-sgd", 4, 4), ("fzoo", 1.0, 6),
                                             ("meazo", 1, 1)])
def test_the_average_equals_the_mean_of_the_last_k_iterates(method, last, k):
    engine, iterates = _trained(method, zo2=False)
    assert average_iterates(engine, last) == k
    mean = torch.stack(iterates[-k:]).mean(0)
    assert not iterates[-1].equal(iterates[-2])
    # float64: the replay and the mean differ by rounding of sums of STEPS terms, ~1e-16 relative
    torch.testing.assert_close(masters(engine), mean, rtol=0, atol=1e-13)


def test_averaging_offloaded_equals_resident_bitwise():
    resident, _ = _trained(zo2=False)
    offloaded, _ = _trained(zo2=True)
    average_iterates(resident, 0.5)
    average_iterates(offloaded, 0.5)
    assert masters(resident).equal(masters(offloaded))


@pytest.mark.parametrize("config", [dict(method="adamezo"), dict(weight_decay=0.1)])
def test_averaging_refuses_updates_that_depend_on_the_weights(config):
    engine = ZOEngine(make_model("opt"), ZOConfig(working_device="cpu", zo2=False, **config))
    engine.step(BATCH)
    with pytest.raises(ValueError, match="lr \\* g \\* z"):
        average_iterates(engine, 0.5)
