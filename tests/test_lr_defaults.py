"""Every method trains at its own defaults: one table of default lr/eps per method, ``ZOConfig(lr=None)``
resolved by the engine (``engine.lr`` / ``engine.lr_source``), and a warning for an lr far off a method's
scale."""
import logging

import pytest
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine
from zo2.config import ZOConfigError
from zo2.methods import DEFAULTS, METHODS

BATCH = make_batch(batch=4, length=8)


def _engine(method: str, **config) -> ZOEngine:
    return ZOEngine(make_model("opt"), ZOConfig(working_device="cpu", method=method, seed=1, **config))


def test_every_registered_method_has_one_row_of_defaults():
    assert set(DEFAULTS) == set(METHODS)
    assert all(row.lr > 0 and row.eps > 0 and row.scale for row in DEFAULTS.values())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_at_its_defaults_and_offloaded_equals_resident(method):
    resident, offloaded = _engine(method, zo2=False), _engine(method, zo2=True)
    assert (resident.lr, resident.lr_source) == (DEFAULTS[method].lr, f"default of {method}")
    assert resident.config.eps == DEFAULTS[method].eps
    before = resident.loss(BATCH)
    start = masters(resident)
    for _ in range(10):
        resident.step(BATCH)
        offloaded.step(BATCH)
    assert resident.loss(BATCH) < before
    assert not masters(resident).equal(start)  # it moved, so the equality below is not vacuous
    assert masters(resident).equal(masters(offloaded))  # invariant 1 of docs/design.md


def test_a_given_lr_is_kept_and_says_so():
    engine = _engine("mezo-sgd", lr=2e-5, zo2=False)
    assert (engine.lr, engine.lr_source) == (2e-5, "given")
    assert engine.step(BATCH).lr == 2e-5


def test_an_lr_off_the_method_scale_is_warned_about_naming_the_scale(caplog):
    with caplog.at_level(logging.WARNING, logger="zo2.engine"):
        _engine("fzoo", lr=DEFAULTS["mezo-sgd"].lr, zo2=False)
    assert "scale of method 'fzoo'" in caplog.text and DEFAULTS["fzoo"].scale in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zo2.engine"):
        _engine("fzoo", lr=DEFAULTS["fzoo"].lr * 3, zo2=False)
        _engine("mezo-sgd", zo2=False)
    assert "scale of method" not in caplog.text


@pytest.mark.parametrize("field, value, others", [
    ("lr", -1.0, {}), ("lr", "fast", {}), ("lr", float("inf"), {}), ("lr", True, {}), ("average_last", 1.5, {}),
    ("average_last", -0.1, {}), ("eps", 0.0, {}), ("average_last", 0.5, {"method": "adamezo"}),
    ("average_last", 0.5, {"weight_decay": 0.1})])
def test_bad_lr_fields_are_refused_naming_the_field(field, value, others):
    with pytest.raises(ZOConfigError, match=f"ZOConfig.{field}="):
        ZOConfig(working_device="cpu", **{field: value}, **others)


def test_an_unsearched_auto_lr_refuses_to_step_and_says_how_to_search():
    engine = _engine("mezo-sgd", lr="auto", zo2=False)
    assert engine.lr is None and engine.lr_source == "auto search pending"
    with pytest.raises(RuntimeError, match="search_lr"):
        engine.step(BATCH)
