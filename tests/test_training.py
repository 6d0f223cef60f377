"""ZO training actually learns: the loss falls when overfitting one small batch, for each architecture."""
import pytest
import torch

from zo2 import ZOConfig, ZOEngine
from zo2.losses import causal_lm_loss
from conftest import ARCHS, make_batch, make_model


def _loss(engine, batch):
    output = engine.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return causal_lm_loss(output.logits, batch["labels"]).item()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_loss_falls_when_overfitting_one_batch(arch):
    batch = make_batch(batch=4, length=8)
    engine = ZOEngine(make_model(arch), ZOConfig(working_device="cpu", lr=5e-3, eps=1e-3, seed=1))
    before = _loss(engine, batch)
    for _ in range(60):
        engine.step(batch)
    after = _loss(engine, batch)
    assert after < before - 0.02, f"{arch}: loss {before:.4f} -> {after:.4f}"
