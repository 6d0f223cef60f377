"""lr="auto": the search returns the engine to its start exactly, the training after it is bit for bit the
run the picked lr makes directly, and the search stops, resumes and fails cleanly. Disk-offloaded engines:
test_disk_search_and_averaging.py."""
import pytest
import torch
from dist_worker import launch, results_of, search_and_train
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine
from zo2.methods import DEFAULTS, METHODS
from zo2.tuning import CONFIRM, LRSearchError, LRSearchInterrupted, carve_validation, search_lr, search_steps

TRAIN = [make_batch(batch=4, length=8, seed=s) for s in range(3)]
VALIDATION = [make_batch(batch=4, length=8, seed=10 + s) for s in range(2)]
FACTORS = (0.3, 1.0, 30.0)
OVERSHOOT = (1000.0, 3000.0, 5000.0)
"""On the float64 tiny OPT, 5000x the default scores best after 1 step and overshoots by step 3."""


def _batches(step: int) -> dict:
    return TRAIN[step % len(TRAIN)]


def _engine(lr, model=None, **config) -> ZOEngine:
    config = {"working_device": "cpu", "seed": 3, "zo2": False, **config}
    return ZOEngine(model if model is not None else make_model("opt"), ZOConfig(lr=lr, **config))


def _train(engine: ZOEngine, steps: int = 3) -> torch.Tensor:
    for step in range(steps):
        engine.step(_batches(step))
    return masters(engine)


@pytest.mark.parametrize("method, zo2", [(m, True) for m in sorted(METHODS)] + [("mezo-sgd", False)])
def test_the_run_after_the_search_is_bitwise_the_direct_run_at_the_pick(method, zo2):
    engine = _engine("auto", method=method, zo2=zo2)
    start = masters(engine)
    result = search_lr(engine, _batches, VALIDATION, steps=2, factors=FACTORS)
    assert masters(engine).equal(start) and engine.step_count == 0  # exact restart
    assert (engine.lr, engine.lr_source) == (result.lr, "auto search")
    assert [row["lr"] for row in result.table[:3]] == [DEFAULTS[method].lr * f for f in FACTORS]
    searched = _train(engine)
    direct = _train(_engine(result.lr, method=method, zo2=zo2))
    assert not searched.equal(start)
    assert searched.equal(direct)


def test_the_search_restores_lora_adapters_exactly():
    peft = pytest.importorskip("peft")

    def lora():
        return peft.get_peft_model(make_model("llama", num_hidden_layers=2),
                                   peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    engine = _engine("auto", model=lora(), zo2=True)
    start = masters(engine)
    result = search_lr(engine, _batches, VALIDATION, steps=2, factors=(1.0, 1000.0))
    assert masters(engine).equal(start)
    assert _train(engine).equal(_train(_engine(result.lr, model=lora(), zo2=True)))


def _screen_and_confirm(result) -> tuple[list[dict], list[dict]]:
    screen = [row for row in result.table if row["stage"] == "screen"]
    confirm = [row for row in result.table if row["stage"] == "confirm"]
    assert result.table == tuple(screen + confirm)
    return screen, confirm


@pytest.mark.parametrize("factors", [FACTORS, (1.0, 10.0, 100.0, 1000.0)])
def test_the_screen_best_meets_the_next_smaller_lr_over_longer_trials(factors):
    engine = _engine("auto")
    result = search_lr(engine, _batches, VALIDATION, steps=2, factors=factors)
    screen, confirm = _screen_and_confirm(result)
    assert [row["lr"] for row in screen] == [DEFAULTS["mezo-sgd"].lr * f for f in factors]
    best = min(screen, key=lambda row: row["score"])
    assert best["score"] < result.start_score  # the tiny task learns: a real best, not the fallback
    if best is screen[0]:  # nothing smaller to confirm against
        assert not confirm and result.lr == best["lr"]
    else:
        lower = screen[screen.index(best) - 1]
        assert [(row["lr"], row["steps"]) for row in confirm] == [(lower["lr"], 2 * CONFIRM), (best["lr"], 2 * CONFIRM)]
        assert result.lr == (best["lr"] if confirm[1]["score"] < confirm[0]["score"] else lower["lr"])
    assert all(set(row) == {"stage", "lr", "steps", "score", "seconds", "forward_passes"} for row in result.table)
    assert all(row["forward_passes"] == row["steps"] * 2 + len(VALIDATION) for row in result.table)
    assert sum(row["steps"] for row in result.table) <= search_steps(2, len(factors))
    assert result.describe().count("picked") == 1
    assert result.forward_passes == sum(row["forward_passes"] for row in result.table) + len(VALIDATION)
    assert result.seconds >= sum(row["seconds"] for row in result.table)


def test_the_longer_trial_overturns_a_short_trial_that_favours_the_larger_lr():
    """Short-horizon bias, on a real tiny model: after 1 step the larger lr scores best; over 3 steps it
    overshoots, and the confirmation keeps the smaller lr."""
    engine = _engine("auto", model=make_model("opt", dtype=torch.float64))
    result = search_lr(engine, _batches, VALIDATION, steps=1, factors=OVERSHOOT)
    screen, confirm = _screen_and_confirm(result)
    assert min(screen, key=lambda row: row["score"])["lr"] == screen[-1]["lr"]
    assert confirm[1]["score"] > confirm[0]["score"]
    assert result.lr == screen[-2]["lr"]


def test_a_stop_request_restores_the_start_and_leaves_the_lr_unsearched():
    engine = _engine("auto")
    start, calls = masters(engine), []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3  # inside the second candidate
    with pytest.raises(LRSearchInterrupted):
        search_lr(engine, _batches, VALIDATION, steps=2, factors=FACTORS, should_stop=stop)
    assert masters(engine).equal(start) and engine.step_count == 0 and engine.lr is None


def test_a_searched_lr_survives_the_engine_state_so_a_resume_does_not_search_again():
    engine = _engine("auto")
    result = search_lr(engine, _batches, VALIDATION, steps=1, factors=FACTORS)
    _train(engine, 2)
    resumed = _engine("auto")
    resumed.load_state_dict(engine.state_dict())
    assert (resumed.lr, resumed.lr_source) == (result.lr, "auto search")
    assert resumed.learning_rate.search == result.table


def test_a_budget_that_cannot_fit_one_candidate_is_a_clear_error():
    with pytest.raises(LRSearchError, match="cannot fit one search candidate"):
        search_lr(_engine("auto"), _batches, VALIDATION, steps=2, factors=FACTORS, max_seconds=1e-9)


def test_the_validation_slice_is_carved_from_training_data_disjointly():
    examples = list(range(100))
    pool, validation = carve_validation(examples, 10, seed=0, keep=16)
    assert len(validation) == 10 and sorted(pool + validation) == examples and not set(pool) & set(validation)
    assert carve_validation(examples, 10, seed=0, keep=16) == (pool, validation)
    with pytest.raises(LRSearchError, match="--train-examples"):
        carve_validation(list(range(20)), 10, seed=0, keep=16)
    with pytest.raises(LRSearchError, match="at least 8"):
        carve_validation(examples, 4, seed=0)


@pytest.mark.parametrize("config", [{}, {"perturbation_parallel": 2}])
def test_every_rank_picks_the_same_lr_and_trains_as_one_process(config):
    ranks = results_of(launch(search_and_train, 2, config, 2), 2)
    alone = search_and_train({}, 2)  # one process, full batches
    assert ranks[0]["lr"] == ranks[1]["lr"] == alone["lr"] == 1e-3  # an inner candidate, not the fallback
    assert ranks[0]["scores"] == ranks[1]["scores"]
    assert ranks[0]["scores"] == pytest.approx(alone["scores"], rel=1e-12)
    assert torch.equal(ranks[0]["masters"], ranks[1]["masters"])
    torch.testing.assert_close(ranks[0]["masters"], alone["masters"], rtol=0, atol=1e-12)
