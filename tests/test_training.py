"""ZO training actually learns: the loss falls when overfitting one small batch, for each architecture,
by what the steps' own projected gradients predict."""
import pytest
from tiny import ARCHS, first_order_drop, make_batch, make_model

from zo2 import ZOConfig, ZOEngine
from zo2.objectives.task_loss import causal_lm_loss

# Why this criterion and not "the loss fell by 0.02": one ZO trajectory's drop is a sum of
# lr * (z . grad)^2 over its steps, a chi-square with as many degrees of freedom as steps, so it varies
# by +-20% between seeds over 60 steps, and between CPUs too (AVX2, AVX-512 and AMX kernels round
# differently; ZO turns that rounding of L+ - L- into different g, hence different trajectories). At the
# learning rate the suite used (5e-3) the curvature term lr^2 g^2 z'Hz / 2 also ate most of the drop for
# some architectures (lowest drops over 6 seeds: 0.006 for gemma2, 0.019 for olmo2), so the threshold failed
# on some machines. The realised drop divided by the first-order prediction sum(lr g^2), which share the
# chi-square, is steady instead: at lr 2e-4 over 60 steps (6 seeds each, 15 architectures) it averages
# 0.84 to 1.03 per architecture, 5.8 of its standard deviations above 0.5 for gemma3_text (0.85 +- 0.06,
# lowest seed 0.76) and 14 or more for the others; the other 15, measured at lr 3e-4 over 40 steps (a
# harder setting), were 8 or more above. (It is below 1 where the finite difference with eps 1e-3 is
# not yet linear: there g^2 overstates (z . grad)^2.) A broken update gives
# <= 0 (wrong sign, not applied) or 0 +- 1/sqrt(60) = 0.13 (updating along another z than the one
# measured): far below 0.5.
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
