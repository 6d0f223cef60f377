"""ZO training actually learns: the loss falls when overfitting one small batch, for each architecture,
by what the steps' own projected gradients predict."""
import pytest

from zo2 import ZOConfig, ZOEngine
from zo2.losses import causal_lm_loss
from conftest import ARCHS, first_order_drop, make_batch, make_model

# Why this criterion and not "the loss fell by 0.02": one ZO trajectory's drop is a sum of
# lr * (z . grad)^2 over its steps, a chi-square with as many degrees of freedom as steps, so over 60
# steps it varies by +-20% between seeds, and between CPUs (AVX2, AVX-512 and AMX kernels round
# differently; ZO turns the rounding of L+ - L- into different g, hence different trajectories). At the
# learning rate the suite used (5e-3) the curvature term lr^2 g^2 z'Hz / 2 also ate most of the drop for
# some architectures (olmo2, gemma2: 0.02 to 0.1 over 6 seeds), so a fixed threshold failed on some
# machines. The realised drop divided by the first-order prediction sum(lr * g^2), where both share the
# chi-square, is ~1 for every architecture whatever the seed: with lr 2e-4 it is 0.75 to 1.0, and at
# least 5 standard deviations above 0.5 for each architecture (6 seeds each, see the closing note of
# issue 10). A broken update gives <= 0 (wrong sign, not applied) or 0 +- 1/sqrt(60) = 0.13 (updating
# along another z than the one measured): all far below 0.5.
LR, STEPS, SHARE = 2e-4, 60, 0.5


def _loss(engine, batch):
    output = engine.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return causal_lm_loss(output.logits, batch["labels"]).item()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_loss_falls_when_overfitting_one_batch(arch):
    batch = make_batch(batch=4, length=8)
    engine = ZOEngine(make_model(arch), ZOConfig(working_device="cpu", lr=LR, eps=1e-3, seed=1))
    before = _loss(engine, batch)
    for _ in range(STEPS):
        engine.step(batch)
    after = _loss(engine, batch)
    predicted = first_order_drop(engine.history)
    assert predicted > 0 and before - after > SHARE * predicted, \
        f"{arch}: loss {before:.4f} -> {after:.4f}, first-order prediction {predicted:.4f}"
