"""q-SPSA in one process, and the Role that splits a step's work between processes."""
import threading

import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine, replay
from zo2.updates import noise
from zo2.walk.role import Role

CONFIG = dict(lr=1e-3, eps=1e-3, working_device="cpu")


def test_one_direction_keeps_the_step_seeds():
    engine = ZOEngine(make_model("gpt2"), ZOConfig(seed=7, **CONFIG))
    assert [engine.seeds(t) for t in range(3)] == [[noise.step_seed(7, t)] for t in range(3)]


def test_q_directions_record_q_updates_of_lr_over_q_and_replay_exactly():
    config = ZOConfig(num_directions=3, **CONFIG)
    engine = ZOEngine(make_model("llama"), config)
    results = [engine.step(make_batch(seed=t)) for t in range(2)]
    assert len(engine.history) == 6 and engine.step_count == 2
    assert len({u.seed for u in engine.history}) == 6
    assert all(u.lr == pytest.approx(CONFIG["lr"] / 3) for u in engine.history)
    assert results[1].updates == tuple(engine.history[3:])
    assert results[1].projected_grad == pytest.approx(sum(u.projected_grad for u in results[1].updates) / 3)
    rebuilt = replay(make_model("llama"), engine.history, config)
    assert torch.equal(masters(rebuilt), masters(engine))


def _threads_sum(parties: int):
    """A real all-reduce between threads of one process: each party adds its tensor, all read the sum."""
    barrier, lock, total = threading.Barrier(parties), threading.Lock(), {}

    def all_reduce(stats: torch.Tensor) -> torch.Tensor:
        with lock:
            total["sum"] = total["sum"] + stats if "sum" in total else stats.clone()
        barrier.wait()
        result = total["sum"].clone()
        if barrier.wait() == 0:
            total.clear()
        barrier.wait()
        return result
    return all_reduce


@pytest.mark.parametrize("roles", [
    [Role(sides=("plus",)), Role(sides=("minus",))],
    [Role(directions=(0,)), Role(directions=(1,), sides=("minus",)), Role(directions=(1,), sides=("plus",))],
], ids=["perturbation-parallel", "directions-and-sides"])
def test_roles_that_cover_a_step_together_equal_one_process_bitwise(roles):
    config = ZOConfig(num_directions=2 if len(roles) == 3 else 1, **CONFIG)
    batches = [make_batch(seed=t) for t in range(3)]
    single = ZOEngine(make_model("llama"), config)
    expected = [single.step(batch) for batch in batches]
    reduce = _threads_sum(len(roles))
    engines = [ZOEngine(make_model("llama"), config, role=Role(r.directions, r.sides, reduce)) for r in roles]
    results: dict[int, list] = {}

    def train(rank: int) -> None:
        results[rank] = [engines[rank].step(batch) for batch in batches]

    threads = [threading.Thread(target=train, args=(rank,)) for rank in range(len(roles))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(results[rank] == expected for rank in range(len(roles)))
    assert all(torch.equal(masters(engine), masters(single)) for engine in engines)


def test_partial_role_without_all_reduce_is_refused():
    with pytest.raises(ValueError, match="all_reduce"):
        ZOEngine(make_model("gpt2"), ZOConfig(**CONFIG), role=Role(sides=("plus",)))
    with pytest.raises(ValueError, match="num_directions"):
        ZOEngine(make_model("gpt2"), ZOConfig(**CONFIG), role=Role(directions=(1,), all_reduce=lambda s: s))
    with pytest.raises(ValueError, match="sides"):
        Role(sides=("plus", "plus"))
