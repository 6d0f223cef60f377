"""Distributed training on real processes (gloo, CPU) equals its single-process equivalent.

Each multi-rank job runs in processes started like torchrun starts them (see dist_worker.py); the
single-process references run here, on the same tiny model, batch and seeds.
"""
import functools
from pathlib import Path

import pytest
import torch
from dist_worker import (
    MODEL,
    TRAINING,
    check_config_job,
    launch,
    lose_a_rank,
    results_of,
    resume_in_one_process,
    run_script,
    summary,
    train,
    train_scenarios,
)
from tiny import make_batch, make_model, masters

from zo2 import Update, ZOConfig, ZOEngine, replay
from zo2.checkpoint import load_checkpoint
from zo2.distributed import DistributedError, Grid, role_for
from zo2.updates import noise
from zo2.walk.role import Role

STEPS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The worker processes take the cores; tiny models only lose from intra-op threads competing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _single_cached(steps: int, config: tuple) -> dict:
    return summary(train(ZOConfig(**TRAINING, **dict(config)), steps))


def _single(steps: int = STEPS, **config) -> dict:
    """The single-process reference: ``steps`` steps on the full batch."""
    return _single_cached(steps, tuple(sorted(config.items())))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank job running every mode in turn; ranks[r][mode] = {"masters", "history"(, "shared")}."""
    checkpoint = tmp_path_factory.mktemp("dist")
    scenarios = {
        "data": {"config": {}, "steps": STEPS, "save": str(checkpoint / "data")},
        "perturbation": {"config": {"perturbation_parallel": 2}, "steps": STEPS},
        "directions": {"config": {"num_directions": 2, "direction_parallel": 2}, "steps": STEPS},
        "sliced": {"config": {"sliced_transfers": True}, "steps": STEPS, "save": str(checkpoint / "sliced")},
        "sliced-perturbation": {"config": {"sliced_transfers": True, "perturbation_parallel": 2}, "steps": STEPS},
        "sliced-lagging": {"config": {"sliced_transfers": True, "write_back_every": 2}, "steps": STEPS},
        "sliced-module": {"config": {"sliced_transfers": True, "perturbation_parallel": 2,
                                     "perturbation_scope": "module"}, "steps": STEPS},
    }
    ranks = results_of(launch(train_scenarios, 2, scenarios), 2)
    return ranks, checkpoint


def _assert_ranks_identical(ranks, mode):
    assert torch.equal(ranks[0][mode]["masters"], ranks[1][mode]["masters"])
    assert ranks[0][mode]["history"] == ranks[1][mode]["history"]


def test_data_parallel_with_half_batches_equals_one_process_with_the_full_batch(two_ranks):
    ranks, _ = two_ranks
    _assert_ranks_identical(ranks, "data")
    single = _single()
    torch.testing.assert_close(ranks[0]["data"]["masters"], single["masters"], rtol=1e-9, atol=1e-12)
    grads = [g for _, g, _ in ranks[0]["data"]["history"]]
    assert grads == pytest.approx([g for _, g, _ in single["history"]], rel=1e-7)
    assert [s for s, _, _ in ranks[0]["data"]["history"]] == [s for s, _, _ in single["history"]]


def test_perturbation_parallel_equals_one_process_bitwise(two_ranks):
    ranks, _ = two_ranks
    _assert_ranks_identical(ranks, "perturbation")
    single = _single()
    assert torch.equal(ranks[0]["perturbation"]["masters"], single["masters"])
    assert ranks[0]["perturbation"]["history"] == single["history"]


def test_one_direction_per_rank_equals_one_process_with_q_directions_and_its_replay(two_ranks):
    ranks, _ = two_ranks
    _assert_ranks_identical(ranks, "directions")
    single = _single(num_directions=2)
    assert torch.equal(ranks[0]["directions"]["masters"], single["masters"])
    assert ranks[0]["directions"]["history"] == single["history"]
    updates = [Update(*pair) for pair in ranks[1]["directions"]["history"]]
    replayed = replay(make_model("llama", dtype=torch.float64, **MODEL), updates, ZOConfig(**TRAINING))
    assert torch.equal(masters(replayed), single["masters"])


def test_sliced_transfers_give_the_same_weights_as_unsliced(two_ranks):
    ranks, _ = two_ranks
    for sliced, plain in (("sliced", "data"), ("sliced-perturbation", "perturbation"), ("sliced-lagging", "data"),
                          ("sliced-module", "perturbation")):
        _assert_ranks_identical(ranks, sliced)
        assert torch.equal(ranks[0][sliced]["masters"], ranks[0][plain]["masters"])
        assert ranks[0][sliced]["history"] == ranks[0][plain]["history"]
        assert ranks[0][sliced]["shared"] and ranks[1][sliced]["shared"]  # one copy of the masters per node


def test_a_checkpoint_of_two_ranks_resumes_in_one_process(two_ranks):
    ranks, checkpoints = two_ranks
    resumed = resume_in_one_process(str(checkpoints / "data"), STEPS)
    straight = _single(2 * STEPS)
    torch.testing.assert_close(resumed["masters"], straight["masters"], rtol=1e-9, atol=1e-12)
    assert [s for s, _, _ in resumed["history"]] == [s for s, _, _ in straight["history"]]
    # saved from shared masters by rank 0 alone, after every rank wrote its slices back
    assert torch.equal(resume_in_one_process(str(checkpoints / "sliced"), 0)["masters"], ranks[1]["sliced"]["masters"])


def test_two_by_two_grids_equal_their_single_process_equivalents():
    scenarios = {
        "data x perturbation": {"config": {"perturbation_parallel": 2}, "steps": STEPS},
        "directions x perturbation": {"config": {"num_directions": 2, "direction_parallel": 2,
                                                 "perturbation_parallel": 2}, "steps": STEPS},
    }
    ranks = results_of(launch(train_scenarios, 4, scenarios), 4)
    for mode in scenarios:
        assert all(torch.equal(r[mode]["masters"], ranks[0][mode]["masters"]) for r in ranks)
    torch.testing.assert_close(ranks[0]["data x perturbation"]["masters"], _single()["masters"],
                               rtol=1e-9, atol=1e-12)
    single = _single(num_directions=2)
    assert torch.equal(ranks[0]["directions x perturbation"]["masters"], single["masters"])
    assert ranks[0]["directions x perturbation"]["history"] == single["history"]


@pytest.mark.parametrize("how, timeout", [("kill", 30.0), ("hang", 1.0)])
def test_losing_a_rank_makes_the_other_fail_with_a_clear_error(how, timeout):
    """Rank 1 is SIGKILLed (or hangs) after one step: rank 0 raises DistributedError instead of hanging
    (the launcher kills anything still running after 60 s, so a hang fails the test)."""
    outcomes = launch(lose_a_rank, 2, how, timeout, wait_for={0}, timeout=60)
    status, message = outcomes.get(0, ("no report", "rank 0 hung"))
    assert status == "ok" and message.startswith("zo2 rank 0: the all-reduce of the step's losses over 2 ranks "
                                                 "failed: another rank died, hung past the timeout"), message
    assert 1 not in outcomes


def test_the_example_script_trains_and_saves_under_a_launcher(tmp_path):
    script = Path(__file__).parents[1] / "examples" / "distributed_train.py"
    argv = ["--steps", "4", "--perturbation-parallel", "2", "--sliced-transfers", "--output-dir", str(tmp_path / "out")]
    results_of(launch(run_script, 2, str(script), argv), 2)
    assert load_checkpoint(tmp_path / "out").step == 4


def test_mismatched_configs_are_detected_at_start_up():
    ranks = results_of(launch(check_config_job, 2, [0, 1]), 2)
    for message in ranks:
        assert message == ("ZOConfig.seed differs across ranks (rank 0: 0, rank 1: 1); every rank must train "
                           "with the same configuration")


@pytest.mark.parametrize("config, world_size, field", [
    (dict(perturbation_parallel=2), 3, "ZOConfig.direction_parallel x ZOConfig.perturbation_parallel = 1 x 2"),
    (dict(num_directions=3, direction_parallel=2), 2, "ZOConfig.direction_parallel=2 must divide"),
    (dict(perturbation_parallel=2), 1, "world size 1"),
])
def test_a_world_size_that_does_not_fit_the_grid_is_refused(config, world_size, field):
    with pytest.raises(DistributedError, match=field.replace(".", r"\.")):
        Grid.of(ZOConfig(**config), world_size, 0)


def test_ranks_are_placed_data_parallel_fastest():
    config = ZOConfig(num_directions=2, direction_parallel=2, perturbation_parallel=2)
    grids = [Grid.of(config, 8, rank) for rank in range(8)]
    assert [g.dp_index for g in grids] == [0, 1] * 4
    assert [g.sides for g in grids[:4]] == [("plus",)] * 2 + [("minus",)] * 2
    assert [g.directions(2) for g in grids] == [(0,)] * 4 + [(1,)] * 4


def test_a_single_process_gets_the_default_role():
    assert role_for(ZOConfig(working_device="cpu")) == Role()
    with pytest.raises(DistributedError, match="world size 1"):
        role_for(ZOConfig(working_device="cpu", perturbation_parallel=2))


def _estimates(num_directions: int, samples: int) -> torch.Tensor:
    """``samples`` q-direction estimates (1/q) sum_d g_d z_d of the gradient at the same weights."""
    config = ZOConfig(working_device="cpu", zo2=False, lr=0.0, eps=1e-4, num_directions=num_directions)
    engine = ZOEngine(make_model("llama", dtype=torch.float64), config)
    batch = make_batch()
    rows = []
    for _ in range(samples):  # lr=0: every step sees the same weights, so the estimates are i.i.d.
        updates = engine.step(batch).updates
        rows.append(sum(torch.cat([noise.generate(config.noise, u.seed, unit.index, 0, unit.numel,
                                                  device="cpu").double() for unit in engine.units]) * u.projected_grad
                        for u in updates) / num_directions)
    return torch.stack(rows)


def test_the_variance_of_the_update_falls_as_directions_grow():
    """q directions average q independent estimates: the total variance falls as 1/q. (Step t of a
    q-direction run uses the seeds of steps t*q .. t*q+q-1 of a 1-direction run, so the three runs
    average the same 16 estimates in groups of 1, 2 and 4.)"""
    one, two, four = (_estimates(q, 16 // q).var(dim=0).sum() for q in (1, 2, 4))
    assert one > two > four
    assert one / 8 < four < one / 2
