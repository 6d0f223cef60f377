"""The fused Triton kernel computes what the torch path computes: same z, same updates, same bits.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before the
kernels are first imported) on CPU tensors, at a few thousand elements; with one they run compiled
on CUDA and are checked against the torch path on the CPU. Skipped when triton is not installed.
"""
import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import Update, ZOConfig, ZOEngine, kernels
from zo2.kernels import torch_path, triton_path
from zo2.units.storage import Unit
from zo2.updates import noise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UPDATES = [Update(11, 0.7, 1e-2), Update(2**63 + 5, -3.0, 3e-3), Update(noise.step_seed(0, 9), 1e-3, 1e-4)]


@pytest.fixture(scope="module", autouse=True)
def _interpreted_on_cpu():
    """Kernels are built on first use; on CPU they must be built by the interpreter."""
    with pytest.MonkeyPatch.context() as patch:
        if DEVICE == "cpu":
            patch.setenv("TRITON_INTERPRET", "1")
        if kernels.triton_available():
            triton_path.generate("uniform", 0, 0, 0, 1, device=DEVICE)
        yield


def _buffer(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)


def _unit(buffer: torch.Tensor, n_decay: int, index: int = 2) -> Unit:
    return Unit(index=index, name="unit", params=[], master=buffer, offloaded=False, n_decay=n_decay)


def _within_one_step(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Every element equal, or the next representable value of ``expected`` toward ``actual``."""
    return torch.equal(torch.where(actual == expected, expected, torch.nextafter(expected, actual)), actual)


@needs_triton
@pytest.mark.parametrize("kind,stream", [("rademacher", 0), ("uniform", noise.ROUNDING_STREAM), ("gaussian", 0)])
@pytest.mark.parametrize("seed,unit,start,count", [
    (7, 0, 0, 1000), (2**63 + 3, 5, 1030, 2500), (123, 1, 3, 129),
    (9, 3, noise.CHUNK - 1000, 2000),  # across a chunk boundary of the torch path
    (5, 1, 2**36 + 5, 300),  # counters past 2**32: the counter's high word
])
def test_kernel_noise_is_zo2_noise(kind, stream, seed, unit, start, count):
    """Same counters: Rademacher signs and uniforms bit for bit, Gaussians within float32 rounding."""
    expected = noise.generate(kind, seed, unit, start, count, stream=stream)
    actual = triton_path.generate(kind, seed, unit, start, count, stream=stream, device=DEVICE).cpu()
    if kind == "gaussian":  # log/cos/sin differ in the last bits between implementations
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(actual, expected)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("n,n_decay,signs", [(3001, 1499, (1, -1)), (2048, 2048, (-1,)), (700, 0, (-1, 1))])
def test_update_and_perturb_matches_the_torch_path(dtype, kind, n, n_decay, signs):
    """Three pending updates (weight decay on a prefix, stochastic rounding in 16 bits), then the
    perturbed copies; sizes off multiples of 4 and of the kernel's block."""
    reference = _buffer(n, dtype)
    fused = reference.to(DEVICE, copy=True)
    kwargs = dict(noise_kind=kind, weight_decay=0.1, signs=signs)
    expected = torch_path.update_and_perturb(reference, _unit(reference, n_decay), UPDATES, 77, 1e-3, **kwargs)
    actual = triton_path.update_and_perturb(fused, _unit(fused, n_decay), UPDATES, 77, 1e-3, **kwargs)
    assert len(actual) == len(expected) == len(signs)
    for got, want in zip([fused, *actual], [reference, *expected]):
        got = got.cpu()
        if kind == "rademacher":
            assert torch.equal(got, want)
        elif dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:  # a z a few ulps off can flip a rounding: at most to the adjacent value
            assert _within_one_step(got, want)


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("start,length", [(1499, 700), (3, 129), (2048, 953), (0, 1500)])
def test_a_slice_gets_the_bits_it_gets_within_the_whole_unit(path, dtype, kind, start, length):
    """Module-scoped perturbation updates and perturbs one parameter's slice at its absolute offset:
    z, the decay mask (the prefix [0, 1500) here) and the rounding draws follow the absolute index."""
    impl = torch_path if path == "torch" else triton_path
    whole = _buffer(3001, dtype).to(DEVICE)
    part = whole[start:start + length].clone()
    kwargs = dict(noise_kind=kind, weight_decay=0.1, signs=(1, -1))
    expected = impl.update_and_perturb(whole, _unit(whole, 1500), UPDATES, 77, 1e-3, **kwargs)
    actual = impl.update_and_perturb(part, _unit(whole, 1500), UPDATES, 77, 1e-3, offset=start, **kwargs)
    assert len(actual) == len(expected) == 2
    for got, want in zip([part, *actual], [whole, *expected]):
        assert torch.equal(got, want[start:start + length])
    again = whole[start:start + length].clone()
    impl.apply_updates(again, _unit(whole, 1500), UPDATES[:1], noise_kind=kind, weight_decay=0.1, offset=start)
    impl.apply_updates(whole, _unit(whole, 1500), UPDATES[:1], noise_kind=kind, weight_decay=0.1)
    assert torch.equal(again, whole[start:start + length])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_updates_matches_the_torch_path(dtype):
    reference = _buffer(1500, dtype)
    fused = reference.to(DEVICE, copy=True)
    torch_path.apply_updates(reference, _unit(reference, 600), UPDATES, noise_kind="rademacher", weight_decay=0.05)
    triton_path.apply_updates(fused, _unit(fused, 600), UPDATES, noise_kind="rademacher", weight_decay=0.05)
    assert torch.equal(fused.cpu(), reference)
    assert not torch.equal(reference, _buffer(1500, dtype))


@needs_triton
@pytest.mark.parametrize("dtype,update", [(torch.bfloat16, 1e-3), (torch.float16, 1.2e-4)])
def test_stochastic_rounding_keeps_tiny_updates_in_expectation(dtype, update):
    """An update of about a quarter ulp: each element rounds up or down at random, and the mean over
    many elements moves by the float32 update, where round-to-nearest would not move at all."""
    n = 8192
    buffer = torch.ones(n, dtype=dtype, device=DEVICE)
    step = Update(seed=5, projected_grad=1.0, lr=update)
    triton_path.apply_updates(buffer, _unit(buffer, 0), [step], noise_kind="rademacher", weight_decay=0.0)
    z = noise.generate("rademacher", step.seed, 2, 0, n)
    exact = 1.0 - update * z  # the float32 update
    assert torch.equal(exact.to(dtype), torch.ones(n, dtype=dtype))  # round-to-nearest loses it
    moved = buffer.cpu().float()
    assert len(moved.unique()) == 3  # 1.0 and its neighbours below and above
    for sign in (1.0, -1.0):
        group = moved[z == sign].double()
        # each element rounds to one of two neighbours: the mean's standard error is std / sqrt(n). Five of
        # them hold for any rounding draws and stay below half the update, which round-to-nearest misses by
        # (a window of update / 10 was 2.4 of them for the bf16 update up, where the gap is 2**-7)
        standard_error = group.std().item() / len(group) ** 0.5
        assert group.mean().item() == pytest.approx(1.0 - update * sign, abs=5 * standard_error)
        assert 5 * standard_error < update / 2


@needs_triton
def test_engine_steps_through_the_kernel_as_through_the_torch_path():
    """ZOConfig.kernels picks the backend of every update and perturbation; training gives the same bits."""
    def train(choice: str) -> tuple[torch.Tensor, list[float]]:
        config = ZOConfig(working_device=DEVICE, lr=1e-2, noise="rademacher", storage_dtype="bfloat16",
                          weight_decay=0.05, kernels=choice)
        engine = ZOEngine(make_model("llama"), config)
        losses = [engine.step(make_batch()).loss for _ in range(2)]  # step 2 applies step 1 fused; flush the last
        return masters(engine), losses

    fused_weights, fused_losses = train("triton" if DEVICE == "cpu" else "auto")
    torch_weights, torch_losses = train("torch")
    assert fused_losses == torch_losses
    assert torch.equal(fused_weights, torch_weights)


@needs_triton
def test_the_dispatch_runs_the_chosen_backend():
    """The kernel refuses float64 buffers, the torch path takes them: the error shows who ran."""
    buffer = torch.zeros(256, dtype=torch.float64)
    kernels.apply_updates(buffer, _unit(buffer, 0), UPDATES, noise_kind="gaussian", weight_decay=0.0, backend="torch")
    with pytest.raises(ValueError, match="ZOConfig.kernels='torch' for other dtypes"):
        kernels.apply_updates(buffer, _unit(buffer, 0), UPDATES, noise_kind="gaussian", weight_decay=0.0,
                              backend="triton")


def test_the_backend_choice_picks_the_path(monkeypatch):
    cpu = torch.zeros(4)
    for choice, expected in (("torch", False), ("auto", False)):
        assert kernels.use_triton(cpu, choice) is expected
    with pytest.raises(ValueError, match="kernel backend 'cuda' is unknown.*'auto', 'cpu', 'torch', 'triton'"):
        kernels.use_triton(cpu, "cuda")
    monkeypatch.setenv(kernels.ENV_DEFAULT, "Torch")
    assert ZOConfig(working_device="cpu").kernels == "torch"  # the environment gives the default
    monkeypatch.setenv(kernels.ENV_DEFAULT, "cuda")
    with pytest.raises(ValueError, match="ZOConfig.kernels='cuda' is invalid"):
        ZOConfig(working_device="cpu")


@needs_triton
def test_bad_requests_are_refused():
    buffer = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="signs must be distinct values of"):
        triton_path.update_and_perturb(buffer, _unit(buffer, 0), [], 1, 1e-3, noise_kind="gaussian",
                                       weight_decay=0.0, signs=(2,))
    with pytest.raises(ValueError, match="noise_kind must be 'gaussian' or 'rademacher'"):
        triton_path.apply_updates(buffer, _unit(buffer, 0), UPDATES, noise_kind="uniform", weight_decay=0.0)
