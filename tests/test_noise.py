"""Noise is counter-based: a pure function of (seed, unit, element), never touching global RNG."""
import pytest
import torch

from zo2 import noise


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


def test_the_engine_compiles_the_noise_path_at_load_time_not_in_the_first_step(monkeypatch):
    """The first step is no slower than the next ones: zo_init runs every noise call of a step once."""
    from zo2 import ZOConfig, ZOEngine
    from conftest import make_batch, make_model

    compiled = []
    monkeypatch.setattr(noise, "_compiled", {})
    monkeypatch.setattr(noise, "_compile_failed", False)  # an earlier real compile may have failed on this CPU
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    engine = ZOEngine(make_model("llama", hidden_size=64, intermediate_size=1024),
                      ZOConfig(working_device="cpu", storage_dtype="bfloat16"))
    assert max(u.numel for u in engine.units) >= 4 * noise._COMPILE_MIN_COUNTERS  # large enough to compile
    assert set(compiled) == {noise._philox_folded}  # Gaussian z and the rounding draws share it
    engine.step(make_batch())
    engine.step(make_batch())
    assert len(compiled) == 1


def test_the_compiled_generator_sees_one_grad_mode(monkeypatch):
    """Engine construction runs with autograd on, steps under no_grad: the compiled generator must not
    recompile between them (torch.compile guards on the grad mode)."""
    modes = []
    compiled = lambda *args: modes.append(torch.is_grad_enabled()) or noise._philox_folded(*args)
    monkeypatch.setattr(noise, "_maybe_compiled", lambda fn, n, device: compiled if fn is noise._philox_folded else fn)
    noise.generate("gaussian", 1, 0, 0, 64)
    with torch.no_grad():
        noise.generate("gaussian", 1, 0, 0, 64)
    assert modes == [False, False]
