"""Noise is counter-based: a pure function of (seed, unit, element), never touching global RNG."""
import pytest
import torch

from zo2.updates import noise


def test_philox_matches_known_answer_vectors():
    """Random123's published Philox-4x32-10 vectors (the generator Triton's tl.randn uses)."""
    def words(key, counter):
        ctr = torch.tensor([counter[0] | counter[3] << 32], dtype=torch.int64)
        return [int(w) for w in noise.philox(key, ctr, counter[1], counter[2])[0]]

    assert words(0, (0, 0, 0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    key = 0xA4093822 | 0x299F31D0 << 32
    assert words(key, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "uniform"])
def test_values_do_not_depend_on_how_a_range_is_sliced(kind):
    total = noise.CHUNK + 1000
    whole = noise.generate(kind, 7, 3, 0, total)
    cuts = [0, 1, 5, 131, noise.CHUNK - 3, noise.CHUNK + 2, total]
    pieces = torch.cat([noise.generate(kind, 7, 3, a, b - a) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(whole, pieces)


def test_values_do_not_depend_on_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = noise.generate("gaussian", 11, 0, 0, 300_001)
        torch.set_num_threads(max(2, before))
        multi = noise.generate("gaussian", 11, 0, 0, 300_001)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, multi)


def test_streams_are_distinct_and_reproducible():
    a = noise.generate("gaussian", 1, 0, 0, 1000)
    assert torch.equal(a, noise.generate("gaussian", 1, 0, 0, 1000))
    for other in (noise.generate("gaussian", 2, 0, 0, 1000), noise.generate("gaussian", 1, 1, 0, 1000),
                  noise.generate("gaussian", 1, 0, 0, 1000, stream=noise.ROUNDING_STREAM)):
        assert not torch.equal(a, other)
        assert abs(torch.corrcoef(torch.stack((a, other)))[0, 1]) < 0.15


def test_global_rng_is_never_touched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    noise.generate("gaussian", 5, 2, 17, 5000)
    noise.generate("rademacher", 5, 2, 17, 5000)
    assert torch.equal(state, torch.get_rng_state())


def test_distributions():
    z = noise.generate("gaussian", 3, 0, 0, 400_000).double()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((z ** 4).mean() - 3) < 0.1  # a normal's kurtosis, not a uniform's
    signs = noise.generate("rademacher", 3, 0, 0, 100_000)
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and abs(signs.mean()) < 0.02
    u = noise.generate("uniform", 3, 0, 0, 100_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_rademacher_bit_layout():
    """Element j takes bit j % 32 of word (j % 128) // 32 of counter j // 128 (Triton-friendly)."""
    words = noise.philox(9, torch.arange(2, dtype=torch.int64), 4, 0)
    expected = torch.tensor([1 - 2 * ((int(words[j // 128, (j % 128) // 32]) >> (j % 32)) & 1) for j in range(256)],
                            dtype=torch.float32)
    assert torch.equal(noise.generate("rademacher", 9, 4, 0, 256), expected)


def test_step_seeds_are_distinct_and_pure():
    seeds = [noise.step_seed(0, t) for t in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert noise.step_seed(0, 5) == noise.step_seed(0, 5) != noise.step_seed(1, 5)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="unknown noise kind"):
        noise.generate("cauchy", 0, 0, 0, 10)
    with pytest.raises(ValueError, match="non-negative"):
        noise.generate("gaussian", 0, 0, -1, 10)


def test_the_gaussian_transform_is_accurate_to_about_one_ulp():
    """Generator version 2: log and cos/sin(2 pi u) in basic float32 operations, against float64."""
    u = torch.cat([torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)),
                   torch.tensor([1e-7, 0.125, 0.375, 0.625, 0.875, 0.5, 1 - 2**-24])])
    log = noise._log(u.clamp_min(1e-7)).double()
    exact = u.clamp_min(1e-7).double().log()
    ulp = torch.nextafter(exact.float().abs(), torch.tensor(float("inf"))).double() - exact.float().abs().double()
    assert ((log - exact).abs() / ulp).max() < 1.0
    cos, sin = noise._cos_sin_2pi(u)
    angle = 2 * torch.pi * u.double()
    assert (cos.double() - angle.cos()).abs().max() < 1.2e-7 and (sin.double() - angle.sin()).abs().max() < 1.2e-7


def test_state_from_another_generator_version_is_refused():
    """Replaying updates whose z came from another generator would silently give other weights."""
    from tiny import make_batch, make_model

    from zo2 import ZOConfig, ZOEngine

    engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu"))
    engine.step(make_batch())
    state = engine.state_dict()
    log = state["log"]
    assert log["generator_version"] == noise.GENERATOR_VERSION
    older = [{**log, "generator_version": 1}, {k: v for k, v in log.items() if k != "generator_version"}]
    for old in [{**state, "log": entry} for entry in older]:
        with pytest.raises(ValueError, match="noise generator version 1, this zo2 generates z with version 2"):
            ZOEngine(make_model("llama"), ZOConfig(working_device="cpu")).load_state_dict(old)


def test_a_seed_log_of_another_generator_version_is_refused(tmp_path):
    import json

    from tiny import make_batch, make_model

    from zo2 import ZOConfig, ZOEngine
    from zo2.checkpoint import CheckpointError, read_seed_log, save_seed_log

    engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu"))
    engine.step(make_batch())
    path = save_seed_log(engine, tmp_path / "log.json")
    assert read_seed_log(path)["generator_version"] == noise.GENERATOR_VERSION
    log = json.loads(path.read_text())
    del log["generator_version"]  # a log written before versions were recorded: version 1
    path.write_text(json.dumps(log))
    with pytest.raises(CheckpointError, match="log.json was made with noise generator version 1"):
        read_seed_log(path)
