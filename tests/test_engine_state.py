"""state_dict / load_state_dict: a flushed checkpoint plus the engine state resumes exactly."""
import json

import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine

CONFIG = dict(lr=1e-3, eps=1e-3, working_device="cpu")


@pytest.mark.parametrize("num_directions", [1, 2])
def test_resume_from_weights_and_state_equals_training_straight(num_directions):
    config = ZOConfig(num_directions=num_directions, **CONFIG)
    batches = [make_batch(seed=t) for t in range(6)]
    straight = ZOEngine(make_model("qwen2"), config)
    expected = [straight.step(b) for b in batches]

    first = ZOEngine(make_model("qwen2"), config)
    for batch in batches[:3]:
        first.step(batch)
    first.flush()
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    state = json.loads(json.dumps(first.state_dict()))

    model = make_model("qwen2", seed=1)
    model.load_state_dict(weights)
    resumed = ZOEngine(model, config)
    resumed.load_state_dict(state)
    assert [resumed.step(b) for b in batches[3:]] == expected[3:]
    assert torch.equal(masters(resumed), masters(straight))
    assert resumed.history == straight.history


def test_state_on_base_weights_replays_the_history():
    config = ZOConfig(**CONFIG)
    trained = ZOEngine(make_model("gpt2"), config)
    for t in range(3):
        trained.step(make_batch(seed=t))
    rebuilt = ZOEngine(make_model("gpt2"), config)
    rebuilt.load_state_dict(trained.state_dict(), weights_updated=False)
    assert torch.equal(masters(rebuilt), masters(trained))


def test_state_from_another_noise_kind_is_refused():
    trained = ZOEngine(make_model("gpt2"), ZOConfig(noise="rademacher", **CONFIG))
    trained.step(make_batch())
    engine = ZOEngine(make_model("gpt2"), ZOConfig(**CONFIG))
    with pytest.raises(ValueError, match="noise"):
        engine.load_state_dict(trained.state_dict())
