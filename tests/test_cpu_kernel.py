"""The fused CPU kernel computes exactly what the torch path computes: same z, same updates, same bits.

The kernel is built once per machine (cached); every comparison here is bitwise, for Gaussian z too
(the kernel and the torch reference use the same float32 operations, generator version 2)."""
import logging

import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import Update, ZOConfig, ZOEngine, kernels
from zo2.kernels import cpu_fused, torch_path
from zo2.units.storage import Unit
from zo2.updates import noise

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason="no C++ compiler: the fused CPU kernel is not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UPDATES = [Update(11, 0.7, 1e-2), Update(2**63 + 5, -3.0, 3e-3), Update(noise.step_seed(0, 9), 1e-3, 1e-4)]


def _buffer(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Normal values at scales from 1e-8 to 3e4 (bf16/fp16 subnormals and fp16's top binade), zeros of
    both signs: every branch of the 16-bit conversions and of stochastic rounding."""
    generator = torch.Generator().manual_seed(n)
    scale = 10.0 ** torch.randint(-8, 5, (n,), generator=generator).float()
    values = torch.randn(n, generator=generator) * scale
    values[::97], values[1::97] = 0.0, -0.0
    if dtype == torch.float16:
        values = values.clamp(-6e4, 6e4)
    return values.to(dtype)


def _unit(buffer: torch.Tensor, n_decay: int, index: int = 2) -> Unit:
    return Unit(index=index, name="unit", params=[], master=buffer, offloaded=False, n_decay=n_decay)


@pytest.mark.parametrize("kind,stream", [("gaussian", 0), ("rademacher", 0), ("uniform", noise.ROUNDING_STREAM)])
@pytest.mark.parametrize("seed,unit,start,count", [
    (7, 0, 0, 5000), (2**63 + 3, 5, 1030, 2500), (123, 1, 3, 129),
    (9, 3, noise.CHUNK - 1000, 2000),  # across a chunk boundary of the torch path
    (5, 1, 2**36 + 5, 300),  # counters past 2**32: the counter's high word
    (5, 1, 4 * 2**32 - 3000, 6000),  # Gaussian counters crossing 2**32 inside one block
])
def test_kernel_noise_is_zo2_noise(kind, stream, seed, unit, start, count):
    expected = noise.generate(kind, seed, unit, start, count, stream=stream)
    assert torch.equal(cpu_fused.generate(kind, seed, unit, start, count, stream=stream), expected)


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
@pytest.mark.parametrize("kind,stream", [("gaussian", 0), ("rademacher", 0), ("uniform", noise.ROUNDING_STREAM)])
def test_the_methods_generator_is_zo2_noise_under_every_backend(backend, kind, stream, monkeypatch):
    """kernels.generate (plain-torch update rules: sparse-mezo, adamezo) takes the kernel's generator
    under "auto"/"cpu" and zo2.updates.noise under "torch": the same bits either way."""
    calls = []
    monkeypatch.setattr(cpu_fused, "generate", lambda *a, _real=cpu_fused.generate, **k: calls.append(a) or _real(*a, **k))
    expected = noise.generate(kind, 2**63 + 9, 4, noise.CHUNK - 700, 3000, stream=stream)
    assert torch.equal(kernels.generate(kind, 2**63 + 9, 4, noise.CHUNK - 700, 3000, stream=stream, backend=backend),
                       expected)
    assert len(calls) == (backend != "torch")
    with pytest.raises(ValueError, match="unknown"):
        kernels.generate(kind, 1, 0, 0, 10, backend="fastest")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("n,n_decay,signs,offset", [(3001, 1499, (1, -1), 0), (2048, 2048, (-1,), 5),
                                                    (700, 0, (-1, 1), 1029), (70_001, 30_000, (1, -1), 77)])
def test_update_and_perturb_matches_the_torch_path(dtype, kind, n, n_decay, signs, offset):
    """Three pending updates (weight decay on a prefix, stochastic rounding in 16 bits), then the
    perturbed copies; sizes and offsets off multiples of the kernel's block; a large rate so updates
    cross zeros and binades."""
    reference = _buffer(n, dtype)
    fused = reference.clone()
    updates = [Update(u.seed, u.projected_grad, u.lr * 100) for u in UPDATES]
    kwargs = dict(noise_kind=kind, weight_decay=0.1, signs=signs, offset=offset)
    expected = torch_path.update_and_perturb(reference, _unit(reference, n_decay), updates, 77, 1e-3, **kwargs)
    actual = cpu_fused.update_and_perturb(fused, _unit(fused, n_decay), updates, 77, 1e-3, **kwargs)
    assert len(actual) == len(expected) == len(signs)
    for got, want in zip([fused, *actual], [reference, *expected]):
        assert torch.equal(got.view(torch.int16) if dtype != torch.float32 else got,
                           want.view(torch.int16) if dtype != torch.float32 else want)
    assert not torch.equal(fused, _buffer(n, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_updates_matches_the_torch_path(dtype):
    reference = _buffer(5000, dtype)
    fused = reference.clone()
    torch_path.apply_updates(reference, _unit(reference, 2600), UPDATES, noise_kind="gaussian", weight_decay=0.05,
                             offset=300)
    cpu_fused.apply_updates(fused, _unit(fused, 2600), UPDATES, noise_kind="gaussian", weight_decay=0.05, offset=300)
    assert torch.equal(fused, reference)
    assert not torch.equal(reference, _buffer(5000, dtype))  # the updates changed something to compare


def test_values_do_not_depend_on_thread_count_or_slicing():
    """Threads share out whole blocks; a slice at its absolute offset gets the bits it gets in the unit."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            buffer = _buffer(300_001, torch.bfloat16)
            copies = cpu_fused.update_and_perturb(buffer, _unit(buffer, 150_000), UPDATES, 5, 1e-3,
                                                  noise_kind="gaussian", weight_decay=0.1)
            results.append(torch.cat([buffer, *copies]))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], other) for other in results[1:])
    whole = _buffer(300_001, torch.bfloat16)
    part = whole[123_457:223_457].clone()
    kwargs = dict(noise_kind="gaussian", weight_decay=0.1)
    expected = cpu_fused.update_and_perturb(whole, _unit(whole, 150_000), UPDATES, 5, 1e-3, **kwargs)
    actual = cpu_fused.update_and_perturb(part, _unit(whole, 150_000), UPDATES, 5, 1e-3, offset=123_457, **kwargs)
    assert len(actual) == len(expected) == 2
    for got, want in zip([part, *actual], [whole, *expected]):
        assert torch.equal(got, want[123_457:223_457])


def test_out_receives_the_copies():
    buffer = _buffer(4099, torch.float32)
    out = [torch.full_like(buffer, float("nan")), torch.full_like(buffer, float("nan"))]
    expected = torch_path.update_and_perturb(buffer.clone(), _unit(buffer, 10), UPDATES, 3, 1e-3,
                                             noise_kind="rademacher", weight_decay=0.0)
    copies = cpu_fused.update_and_perturb(buffer, _unit(buffer, 10), UPDATES, 3, 1e-3, noise_kind="rademacher",
                                          weight_decay=0.0, out=out)
    assert copies[0] is out[0] and copies[1] is out[1]
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


def test_auto_picks_the_kernel_on_cpu_and_the_torch_path_for_what_it_cannot_take():
    assert kernels.resolve(torch.zeros(8)) == "cpu"
    assert kernels.resolve(torch.zeros(8, dtype=torch.float64)) == "torch"
    assert kernels.resolve(torch.zeros(8, 2)[:, 0]) == "torch"  # not contiguous
    assert kernels.resolve(torch.zeros(8), out=[torch.zeros(8, dtype=torch.float64)]) == "torch"
    assert kernels.resolve(torch.zeros(8), "torch") == "torch"
    with pytest.raises(ValueError, match="does not take torch.float64.*ZOConfig.kernels='torch'"):
        kernels.apply_updates(torch.zeros(8, dtype=torch.float64), _unit(torch.zeros(8), 0), UPDATES,
                              noise_kind="gaussian", weight_decay=0.0, backend="cpu")


def test_without_a_compiler_auto_falls_back_once_and_cpu_refuses(monkeypatch, tmp_path, caplog):
    """No compiler on PATH: one warning, the torch path under "auto", a clear error under "cpu"."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached there: it would have to build
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_fused, "_library", cpu_fused._library.__wrapped__)
    cpu_fused.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="zo2.kernels.cpu_fused"):
            assert kernels.resolve(torch.zeros(8)) == "torch"
            assert kernels.resolve(torch.zeros(8)) == "torch"
        assert len(caplog.records) == 1 and "no C++ compiler found" in caplog.records[0].getMessage()
        with pytest.raises(RuntimeError, match="kernels='cpu' but the fused CPU kernel cannot be built"):
            kernels.resolve(torch.zeros(8), "cpu")
    finally:
        cpu_fused.available.cache_clear()


def test_a_build_is_cached_and_happens_while_the_engine_is_built(monkeypatch, tmp_path):
    """A fresh cache: the engine's construction builds the kernel once; its steps and a second engine
    (another process would find the same file) build nothing."""
    builds = []
    build = cpu_fused._build
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_fused, "_build", lambda *args: builds.append(args) or build(*args))
    library = cpu_fused._library.__wrapped__
    loads = []
    monkeypatch.setattr(cpu_fused, "_library", lambda: loads.append(1) or library())
    engine = ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", storage_dtype="bfloat16"))
    assert len(builds) == 1 and list((tmp_path / "zo2" / "kernels").glob("*.so"))
    engine.step(make_batch())
    ZOEngine(make_model("llama"), ZOConfig(working_device="cpu"))
    assert len(builds) == 1 and len(loads) > 1


@pytest.mark.parametrize("config", [dict(), dict(storage_dtype="bfloat16", noise="rademacher"),
                                    dict(storage_dtype="float16", zo2=False)])
def test_training_through_the_kernel_equals_training_through_the_torch_path(config):
    def train(choice: str) -> tuple[torch.Tensor, list[float]]:
        cfg = ZOConfig(working_device="cpu", lr=1e-2, weight_decay=0.05, kernels=choice, **config)
        engine = ZOEngine(make_model("llama"), cfg)
        losses = [engine.step(make_batch()).loss for _ in range(3)]
        return masters(engine), losses

    fused_weights, fused_losses = train("cpu")
    torch_weights, torch_losses = train("torch")
    assert fused_losses == torch_losses
    assert torch.equal(fused_weights, torch_weights)
    assert not torch.equal(fused_weights, masters(ZOEngine(make_model("llama"), ZOConfig(working_device="cpu", **config))))


def test_the_noise_benchmark_finds_the_kernel_and_the_torch_path_equal():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "bench" / "noise_bench.py"
    out = subprocess.run([sys.executable, str(script), "--numel", "5000", "--repeats", "1", "--kernels", "cpu", "torch"],
                         capture_output=True, text=True, check=True).stdout
    gaps = [line for line in out.splitlines() if line.startswith("max |cpu - torch|")]
    assert len(gaps) == 4 and all(line.endswith(": 0") for line in gaps), out
