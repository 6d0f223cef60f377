"""A step is accumulate (micro-batches) + commit: gradient accumulation equals one big batch."""
import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine

CONFIG = dict(lr=1e-3, eps=1e-3, working_device="cpu")


def _rows(batch, start, stop):
    return {k: v[start:stop] for k, v in batch.items()}


@pytest.mark.parametrize("head", ["causal", "seq-cls"])
def test_micro_batches_equal_one_batch(head):
    """Losses are combined as sums over their terms, so rows split unevenly (a padded row) still match."""
    batch = make_batch(head, batch=6)
    whole = ZOEngine(make_model("llama", head, dtype=torch.float64), ZOConfig(zo2=False, **CONFIG))
    split = ZOEngine(make_model("llama", head, dtype=torch.float64), ZOConfig(zo2=False, **CONFIG))
    for _ in range(3):
        expected = whole.step(batch)
        result = split.step([_rows(batch, 0, 1), _rows(batch, 1, 4), _rows(batch, 4, 6)])
        assert result.loss == pytest.approx(expected.loss, rel=1e-12)
        assert result.projected_grad == pytest.approx(expected.projected_grad, rel=1e-9, abs=1e-12)
        assert result.seed == expected.seed
    torch.testing.assert_close(masters(split), masters(whole), rtol=0, atol=1e-13)


def test_accumulation_applies_the_pending_update_once_when_offloaded():
    batch = make_batch(batch=4)
    micro = [_rows(batch, 0, 2), _rows(batch, 2, 4)]
    resident = ZOEngine(make_model("opt"), ZOConfig(zo2=False, **CONFIG))
    offloaded = ZOEngine(make_model("opt"), ZOConfig(zo2=True, **CONFIG))
    assert any(u.offloaded for u in offloaded.units)
    for _ in range(3):
        assert offloaded.step(micro) == resident.step(micro)
    assert torch.equal(masters(offloaded), masters(resident))


def test_single_micro_batch_step_is_unchanged_by_accumulate_commit():
    batch = make_batch()
    one = ZOEngine(make_model("gpt2"), ZOConfig(**CONFIG))
    two = ZOEngine(make_model("gpt2"), ZOConfig(**CONFIG))
    for _ in range(2):
        two.accumulate(batch)
        assert two.commit() == one.step(batch)
    assert torch.equal(masters(one), masters(two))


def test_commit_without_accumulate_is_refused():
    engine = ZOEngine(make_model("gpt2"), ZOConfig(**CONFIG))
    with pytest.raises(RuntimeError, match="accumulate"):
        engine.commit()


def test_commit_takes_an_explicit_lr():
    engine = ZOEngine(make_model("gpt2"), ZOConfig(**CONFIG))
    engine.accumulate(make_batch())
    result = engine.commit(lr=0.25)
    assert result.lr == 0.25 and engine.history[-1].lr == 0.25
