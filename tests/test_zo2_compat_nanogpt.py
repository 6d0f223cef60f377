"""ZO2's nanoGPT (``zo2.model.nanogpt``): ZO2's documented flow ``get_nanogpt_mezo_sgd(cfg)(gpt_cfg, cfg)`` and
the plain GPT through ``ZOEngine``, including a batch of 2 whose positions are one shared (1, T) row."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny import masters

from zo2 import ZOEngine, get_nanogpt_mezo_sgd
from zo2.config.mezo_sgd import MeZOSGDConfig
from zo2.model.nanogpt.mezo_sgd import next_token_loss
from zo2.model.nanogpt.model import GPT, GPTConfig, GPTConfigs

TINY = GPTConfig(block_size=32, vocab_size=48, n_layer=2, n_head=2, n_embd=16)
LENGTH = 24  # longer than calibration's 8-token cut, so the shared positions must be cut with the ids


def _data(batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, TINY.vocab_size, (batch, LENGTH), generator=generator)
    return idx, torch.arange(LENGTH).unsqueeze(0), idx


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY).eval()


def test_presets_carry_zo2_names_and_shapes():
    presets = GPTConfigs()
    assert (presets.gpt2.n_layer, presets.gpt2.n_embd) == (12, 768)
    assert (presets.opt_175b.n_layer, presets.opt_175b.n_head, presets.opt_175b.n_embd) == (96, 96, 12288)
    assert {"gpt2_medium", "gpt2_large", "gpt2_xl", "opt_1_3b", "opt_2_7b", "opt_6_7b", "opt_13b", "opt_30b",
            "opt_66b"} <= set(dir(presets))


def test_shared_positions_at_batch_2_train_as_positions_given_per_row():
    """A (1, T) position input is shared by the batch (not cut while the ids are): the steps equal those with
    the positions repeated per row, bit for bit (this raised "size of tensor a (8) must match (64)")."""
    config = MeZOSGDConfig(lr=1e-2, working_device="cpu", seed=3)
    idx, pos, targets = _data(batch=2)
    results = {}
    for name, positions in (("shared", pos), ("per-row", pos.expand(2, -1))):
        engine = ZOEngine(_gpt(), config, objective=next_token_loss,
                          probe_inputs={"idx": idx[:1, :4], "pos": pos[:, :4]})
        steps = [engine.step({"idx": idx, "pos": positions, "targets": targets}) for _ in range(2)]
        results[name] = ([(s.loss, s.loss_minus) for s in steps], masters(engine))
    assert results["shared"][0] == results["per-row"][0]
    assert torch.equal(results["shared"][1], results["per-row"][1])
    assert not torch.equal(results["shared"][1], masters(ZOEngine(_gpt(), config, probe_inputs={
        "idx": idx[:1, :4], "pos": pos[:, :4]})))  # the steps moved the weights


@pytest.mark.parametrize("zo2", [False, True])
def test_zo2_flow_steps_return_the_plus_eps_next_token_loss(zo2):
    """ZO2's test flow: ``MeZOSGDConfig``, ``cfg.zo2 = ...`` set after construction, the class from
    ``get_nanogpt_mezo_sgd``, ``loss = model(idx, pos, targets)`` and ``model.opt.projected_grad``."""
    config = MeZOSGDConfig(lr=1e-2, weight_decay=0.0, eps=1e-3, working_device="cpu", seed=1)
    config.zo2 = zo2
    torch.manual_seed(0)
    model = get_nanogpt_mezo_sgd(config)(TINY, config)
    idx, pos, targets = _data(batch=2)
    loss = model(idx, pos, targets)
    update = model.zo_engine.log.step_updates(0)[0]
    assert model.opt.projected_grad == update.projected_grad and model.opt.zo_random_seed == update.seed
    assert model.opt.lr == config.lr

    # the returned loss is the mean next-token cross-entropy at theta + eps z: replay that perturbation
    reference = ZOEngine(_gpt(), dataclasses.replace(config, lr=0.0), objective=next_token_loss,
                         probe_inputs={"idx": idx[:1, :4], "pos": pos[:, :4]})
    plus = reference.step({"idx": idx, "pos": pos, "targets": targets})
    assert loss.item() == pytest.approx(plus.loss, rel=1e-6)
    assert model.opt.projected_grad == pytest.approx(plus.projected_grad, rel=1e-6)

    model.zo_eval()
    logits, eval_loss = model(idx, pos, targets)
    assert logits.shape == (2, LENGTH, TINY.vocab_size)  # eval: nanoGPT's (logits, loss), targets aligned
    assert eval_loss.item() == F.cross_entropy(logits.reshape(-1, TINY.vocab_size), targets.reshape(-1)).item()


def test_offloaded_and_resident_zo2_flows_end_with_identical_weights():
    """Invariant 1 of docs/design.md through ZO2's nanoGPT flow."""
    trained = {}
    for zo2 in (False, True):
        config = MeZOSGDConfig(lr=1e-2, eps=1e-3, working_device="cpu", seed=2, zo2=zo2)
        torch.manual_seed(0)
        model = get_nanogpt_mezo_sgd(config)(TINY, config)
        for step in range(3):
            model(*_data(batch=2, seed=step))
        trained[zo2] = masters(model.zo_engine)
    assert torch.equal(trained[False], trained[True])


def test_moving_the_engine_model_elsewhere_is_refused():
    config = MeZOSGDConfig(working_device="cpu")
    model = get_nanogpt_mezo_sgd(config)(TINY, config)
    assert model.to("cpu") is model  # ZO2's scripts call .to(working_device)
    with pytest.raises(ValueError, match="working_device"):
        model.to(torch.float64)
