"""ops.mmd: the Triton kernels (interpreter on CPU) against the Gram-matrix reference, the
reference against closed forms and gradcheck, and input validation."""
import pytest
import torch

from condense_engine import ops
from condense_engine.reference import mmd as reference
from tests.hopper_compile import assert_compiles_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (kernel, options): every kernel family, poly degrees 1-4, Gaussian with one, several and
# the default bandwidths.
KERNEL_CASES = [
    ("linear", {}),
    ("poly", dict(degree=1)),
    ("poly", dict(degree=2, coef0=0.5)),
    ("poly", dict(degree=3)),
    ("poly", dict(degree=4, gamma=0.05, coef0=-0.3)),
    ("gaussian", dict(sigmas=4.0)),
    ("gaussian", dict(sigmas=[2.0, 5.0, 9.0])),
    ("gaussian", {}),
]
ESTIMATOR_CASES = [("biased", True), ("unbiased", True), ("biased", False), ("unbiased", False)]


def _features(classes, n, m, dim, dtype=torch.float32, grad_x=True):
    x = torch.randn(classes, n, dim, device=DEVICE).to(dtype).requires_grad_(grad_x)
    y = (0.8 * torch.randn(classes, m, dim, device=DEVICE) + 0.3).to(dtype).requires_grad_()
    return x, y


def _value_and_grads(x, y, kernel, options, backend, reduction="none"):
    """Loss and gradients w.r.t. x and y under random per-class upstream weights."""
    out = ops.mmd(x, y, kernel, reduction=reduction, backend=backend, **options)
    weights = torch.linspace(0.5, 1.5, out.numel(), device=out.device).reshape(out.shape)
    inputs = [t for t in (x, y) if t.requires_grad]
    return out, torch.autograd.grad((out * weights).sum(), inputs)


def _assert_matches_reference(x, y, kernel, options, rtol=2e-4, atol=1e-6, reduction="none"):
    ours, our_grads = _value_and_grads(x, y, kernel, options, "triton", reduction)
    expected, expected_grads = _value_and_grads(x, y, kernel, options, "torch", reduction)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=rtol, atol=atol)
    for got, want in zip(our_grads, expected_grads):
        assert got.dtype == want.dtype
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * scale + 1e-12)


@pytest.mark.parametrize("kernel,options", KERNEL_CASES)
@pytest.mark.parametrize("estimator,include_xx", ESTIMATOR_CASES)
def test_triton_matches_reference(kernel, options, estimator, include_xx):
    # N, M, d are not multiples of the 16-row tiles; C > 1.
    x, y = _features(2, 21, 9, 37)
    _assert_matches_reference(x, y, kernel, dict(options, estimator=estimator,
                                                  include_xx=include_xx), atol=2e-6)


@pytest.mark.parametrize("kernel,options", [("poly", dict(degree=3)),
                                            ("gaussian", dict(sigmas=[3.0, 8.0]))])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_triton_feature_chunks(kernel, options, estimator):
    """d split over several 16-feature chunks: the backward accumulates in memory per chunk."""
    from condense_engine.kernels import mmd as tiled

    x, y = _features(3, 19, 17, 45)
    spec = dict(degree=options.get("degree", 3), gamma=1 / 45, coef0=1.0,
                sigmas=torch.tensor(options.get("sigmas", [1.0]), device=DEVICE),
                unbiased=estimator == "unbiased", include_xx=True)
    chunked = tiled.mmd_per_class(x, y, kernel, block=16, block_d=16, **spec)
    whole = tiled.mmd_per_class(x, y, kernel, block=16, block_d=64, **spec)
    chunked_grads = torch.autograd.grad(chunked.sum(), (x, y))
    whole_grads = torch.autograd.grad(whole.sum(), (x, y))
    expected = reference.mmd(x, y, kernel, estimator=estimator, reduction="none", gamma=1 / 45,
                             **options)
    expected_grads = torch.autograd.grad(expected.sum(), (x, y))
    for value in (chunked, whole):
        torch.testing.assert_close(value, expected, rtol=2e-4, atol=2e-6)
    for grads in (chunked_grads, whole_grads):
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("classes,n,m", [(1, 16, 16), (1, 33, 1), (4, 5, 2)])
def test_triton_sizes(classes, n, m):
    """C = 1, exact tile multiples, IPC 1 (M = 1) and rows fewer than one tile."""
    x, y = _features(classes, n, m, 20)
    _assert_matches_reference(x, y, "gaussian", dict(sigmas=[2.0, 6.0]), atol=2e-6)
    _assert_matches_reference(x, y, "poly", dict(degree=2), atol=2e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reductions(reduction, backend):
    x, y = _features(3, 10, 6, 18)
    per_class = ops.mmd(x, y, "poly", reduction="none", backend=backend)
    out = ops.mmd(x, y, "poly", reduction=reduction, backend=backend)
    expected = {"sum": per_class.sum(), "mean": per_class.mean(), "none": per_class}[reduction]
    assert per_class.shape == (3,)
    torch.testing.assert_close(out, expected)
    _assert_matches_reference(x, y, "poly", {}, reduction=reduction)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_dimensional_inputs_are_one_class(backend):
    x, y = _features(1, 12, 7, 24)
    batched = ops.mmd(x, y, "gaussian", reduction="none", backend=backend)
    flat = ops.mmd(x[0], y[0], "gaussian", reduction="none", backend=backend)
    assert flat.shape == () and batched.shape == (1,)
    torch.testing.assert_close(flat, batched[0])
    _assert_matches_reference(x[0], y[0], "gaussian", dict(estimator="unbiased"))


@pytest.mark.parametrize("kernel,options", [("poly", dict(degree=3)), ("gaussian", {})])
def test_only_y_requires_grad(kernel, options):
    x, y = _features(2, 13, 5, 21, grad_x=False)
    _assert_matches_reference(x, y, kernel, options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel,options", [("poly", dict(degree=3)),
                                            ("gaussian", dict(sigmas=[4.0, 8.0]))])
def test_half_precision_inputs(dtype, kernel, options):
    x, y = _features(2, 20, 11, 32, dtype=dtype)
    ours, our_grads = _value_and_grads(x, y, kernel, options, "triton")
    expected, expected_grads = _value_and_grads(x, y, kernel, options, "torch")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=2e-2, atol=2e-3)
    for got, want in zip(our_grads, expected_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2,
                                   atol=2e-2 * want.float().abs().max().item())


def test_mixed_dtypes_are_promoted():
    x, y = _features(2, 9, 4, 16)
    out = ops.mmd(x.bfloat16(), y, "poly", backend="triton")
    torch.testing.assert_close(out, ops.mmd(x.bfloat16().float(), y, "poly", backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_biased_is_squared_mean_distance(backend):
    x, y = _features(3, 14, 6, 19)
    out = ops.mmd(x, y, "linear", reduction="none", backend=backend)
    expected = (x.mean(1) - y.mean(1)).pow(2).sum(-1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_poly_degree_one_without_offset_is_linear():
    """The tiled kernel with (1·⟨a,b⟩ + 0)^1 reproduces the linear closed form and its grads."""
    x, y = _features(2, 17, 8, 23)
    tiled, tiled_grads = _value_and_grads(
        x, y, "poly", dict(degree=1, gamma=1.0, coef0=0.0, estimator="unbiased"), "triton")
    linear, linear_grads = _value_and_grads(x, y, "linear", dict(estimator="unbiased"), "triton")
    torch.testing.assert_close(tiled, linear, rtol=1e-4, atol=1e-5)
    for got, want in zip(tiled_grads, linear_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kernel", ["linear", "poly", "gaussian"])
def test_dropping_xx_keeps_the_y_gradient(backend, kernel):
    x, y = _features(2, 15, 6, 20)
    with_xx, (grad_with,) = _y_value_and_grad(x, y, kernel, True, backend)
    without_xx, (grad_without,) = _y_value_and_grad(x, y, kernel, False, backend)
    xx_term = reference.pair_mean(
        reference.gram(x.detach().float(), x.detach().float(), kernel, degree=3, gamma=1 / 20,
                       coef0=1.0, sigmas=reference.default_sigmas(x)), False)
    torch.testing.assert_close(with_xx - without_xx, xx_term.sum(), rtol=1e-4, atol=1e-5)
    assert xx_term.abs().sum() > 1e-3
    torch.testing.assert_close(grad_without, grad_with, rtol=1e-5, atol=1e-7)


def _y_value_and_grad(x, y, kernel, include_xx, backend):
    out = ops.mmd(x.detach(), y, kernel, include_xx=include_xx, backend=backend)
    return out, torch.autograd.grad(out, (y,))


@pytest.mark.parametrize("kernel,options", [
    ("linear", {}), ("poly", dict(degree=3, gamma=0.2)), ("gaussian", dict(sigmas=[0.7, 2.0]))])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_reference_gradcheck(kernel, options, estimator):
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: reference.mmd(a, b, kernel, estimator=estimator, reduction="none",
                                   **options), (x, y))


def test_reference_unbiased_excludes_diagonal():
    """Unbiased x–x and y–y means skip i = i′: check against an explicit double loop."""
    x, y = torch.randn(4, 3), torch.randn(3, 3)

    def k(a, b):
        return (a @ b / 3 + 1.0) ** 2

    def mean_pairs(a, b, skip_same):
        values = [k(a[i], b[j]) for i in range(len(a)) for j in range(len(b))
                  if not (skip_same and i == j)]
        return sum(values) / len(values)

    expected = mean_pairs(x, x, True) + mean_pairs(y, y, True) - 2 * mean_pairs(x, y, False)
    out = reference.mmd(x, y, "poly", degree=2, estimator="unbiased")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_default_sigmas_follow_the_mean_heuristic():
    x = 3.0 * torch.randn(2, 9, 5)
    pairwise = torch.cdist(x, x).pow(2).mean()
    expected = pairwise.sqrt() * torch.tensor(reference.DEFAULT_SIGMA_FACTORS)
    torch.testing.assert_close(reference.default_sigmas(x), expected, rtol=1e-5, atol=1e-6)


def test_sigmas_accept_number_sequence_and_tensor():
    x, y = _features(1, 8, 5, 12)
    number = ops.mmd(x, y, "gaussian", sigmas=3.0, backend="triton")
    listed = ops.mmd(x, y, "gaussian", sigmas=[3.0], backend="triton")
    tensor = ops.mmd(x, y, "gaussian", sigmas=torch.tensor([3.0]), backend="triton")
    torch.testing.assert_close(number, listed)
    torch.testing.assert_close(number, tensor)


def _valid():
    return dict(x=torch.randn(2, 6, 8), y=torch.randn(2, 4, 8))


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(6)), "x must be"),
    (dict(y=torch.randn(1, 2, 4, 8)), "y must be"),
    (dict(x=torch.randn(6, 8)), "x and y must both be 2-D"),
    (dict(y=torch.randn(2, 4, 7)), "feature size d"),
    (dict(y=torch.randn(3, 4, 8)), "number of classes C"),
    (dict(x=torch.randint(0, 5, (2, 6, 8))), "x must be float32"),
    (dict(y=torch.randn(2, 4, 8, dtype=torch.float64)), "y must be float32"),
    (dict(y=torch.randn(2, 1, 8), estimator="unbiased"), "y needs at least 2 row"),
    (dict(x=torch.randn(2, 0, 8)), "x needs at least 1 row"),
    (dict(x=torch.full((2, 6, 8), float("nan"))), "x contains NaN"),
    (dict(y=torch.full((2, 4, 8), float("inf"))), "y contains NaN"),
    (dict(kernel="laplace"), "kernel must be"),
    (dict(estimator="mixed"), "estimator must be"),
    (dict(reduction="max"), "reduction must be"),
    (dict(kernel="poly", degree=0), "degree"),
    (dict(kernel="poly", degree=2.5), "degree"),
    (dict(kernel="poly", gamma=float("inf")), "gamma"),
    (dict(kernel="gaussian", sigmas=[1.0, 0.0]), "sigmas"),
    (dict(kernel="gaussian", sigmas=-2.0), "sigmas"),
    (dict(kernel="gaussian", sigmas=[]), "sigmas"),
])
def test_bad_input(change, match):
    args = _valid()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.mmd(**args, backend="torch")


def test_triton_without_interpreter_or_gpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        ops.mmd(torch.randn(4, 3), torch.randn(2, 3), "poly", backend="triton")


def test_automatic_backend_on_cpu_is_the_reference():
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    torch.testing.assert_close(ops.mmd(x, y, "poly"), reference.mmd(x, y, "poly"))


def test_kernels_compile_for_hopper():
    """The GPU build (not the interpreter) of every kernel variant kind."""
    from condense_engine.kernels import mmd as tiled

    builds = []
    for dtype, precision in (("fp32", "tf32x3"), ("bf16", "tf32")):
        types = {"*pointer": "*fp32", "*scalar": "fp32",
                 **{name: f"*{dtype}" for name in ("x_ptr", "y_ptr", "q_ptr", "o_ptr")},
                 **{name: "i32" for name in ("n", "m", "q_count", "o_count", "dim")}}
        shared = dict(UNBIASED=True, KERNEL=tiled.KERNEL_IDS["gaussian"], DEGREE=3, NUM_SIGMAS=2,
                      BLOCK=64, PRECISION=precision, FP32_DOT=False)
        builds.append(("_mmd_forward_kernel", types, dict(shared, INCLUDE_XX=True, BLOCK_D=64)))
        builds += [("_mmd_backward_kernel", types,
                    dict(shared, HAS_SAME=True, BLOCK_D=block_d, ONE_CHUNK=one_chunk))
                   for one_chunk, block_d in ((True, 128), (False, 64))]
    assert_compiles_for_hopper("condense_engine.kernels.mmd", builds)
