"""ops.moments: the Triton kernels (interpreter on CPU) against the reference, forward and
gradient, over orders, odd sizes, classes and dtypes; the reference against closed forms; and
input validation."""
import pytest
import torch

from condense_engine import ops
from condense_engine.errors import NonFiniteError
from condense_engine.kernels import moments as kernel
from tests.hopper_compile import assert_compiles_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _features(shape, seed=0, dtype=torch.float32):
    """Skewed, shifted features (ReLU-like, as embeddings are), so every moment is non-zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).exp() - 0.5 + 0.3 * torch.randn(shape, generator=g)
    return x.to(DEVICE, dtype).requires_grad_()


def _value_and_grad(x, order, backend, upstream):
    out = ops.moments(x, order, backend=backend)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out, grad


def _assert_triton_matches_reference(x, order, rtol=1e-4, atol=1e-5):
    upstream = torch.randn((*x.shape[:-2], order, x.shape[-1]), generator=torch.Generator().manual_seed(1))
    upstream = upstream.to(DEVICE)
    ours, our_grad = _value_and_grad(x, order, "triton", upstream)
    want, want_grad = _value_and_grad(x, order, "torch", upstream)
    assert ours.dtype == torch.float32 and ours.shape == want.shape == upstream.shape
    assert our_grad.dtype == x.dtype and our_grad.shape == x.shape
    torch.testing.assert_close(ours, want, rtol=rtol, atol=atol)
    torch.testing.assert_close(our_grad.float(), want_grad.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(3, 37, 70), (1, 130, 5), (67, 9), (2, 1, 4)])
def test_triton_matches_reference(order, shape):
    """Odd row and feature counts (not multiples of the blocks), C = 1 and C > 1, 2-D input, one row."""
    _assert_triton_matches_reference(_features(shape), order)


@pytest.mark.parametrize("rows, splits", [(45, 1), (45, 3), (45, 4), (5, 3), (64, 2)])
def test_triton_walks_rows_and_features_in_several_blocks_and_ranges(monkeypatch, rows, splits):
    """Several row chunks and feature blocks per class, and each class's rows split into ranges
    (the GPU's launch for tall inputs), including a range that ends inside a chunk."""
    monkeypatch.setattr(kernel, "launch_shape", lambda *args: kernel.LaunchShape(8, 16, 1, splits))
    _assert_triton_matches_reference(_features((2, rows, 37), seed=2), 4)


def test_gpu_launch_splits_the_rows_of_few_classes():
    shape = kernel.LaunchShape(32, 128, 4, 3)
    assert shape.rows_per_split(1000) == 352 and shape.grid(2, 1000, 200) == (2, 2, 3)
    assert kernel.LaunchShape(32, 128, 4, 8).grid(1, 40, 128) == (1, 1, 2)  # whole chunks: 2 ranges, not 8


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_triton_half_precision_inputs_accumulate_in_fp32(dtype, rtol):
    """The moments (fp32) agree closely; the gradients, stored in x's dtype, to its rounding."""
    x = _features((2, 40, 24), seed=3, dtype=dtype)
    _assert_triton_matches_reference(x, 3, rtol=rtol, atol=2e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moments_are_their_definitions(backend):
    """Mean, biased variance, and the third and fourth centred moments, in float64 by hand."""
    x = _features((2, 50, 6), seed=4)
    out = ops.moments(x, 4, backend=backend)
    exact = x.detach().double()
    centred = exact - exact.mean(1, keepdim=True)
    torch.testing.assert_close(out[:, 0], exact.mean(1).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, 1], exact.var(1, unbiased=False).float(), rtol=1e-5, atol=1e-6)
    for k in (3, 4):
        torch.testing.assert_close(out[:, k - 1], centred.pow(k).mean(1).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shifting_the_features_moves_only_the_mean(backend):
    x = _features((1, 30, 8), seed=5)
    moved = ops.moments(x + 3.0, 4, backend=backend)
    still = ops.moments(x, 4, backend=backend)
    torch.testing.assert_close(moved[:, 0], still[:, 0] + 3.0)
    torch.testing.assert_close(moved[:, 1:], still[:, 1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", [0, -1, 2.0, True, None])
def test_bad_order_is_refused(order):
    with pytest.raises(ValueError, match="order"):
        ops.moments(_features((3, 4)), order)


@pytest.mark.parametrize("x, message", [
    (torch.zeros(5), "rows, d"), (torch.zeros(1, 2, 3, 4), "rows, d"), (torch.zeros(3, 4, dtype=torch.int64), "float32"),
    (torch.zeros(2, 0, 4), "at least one"), (torch.zeros(3, 0), "at least one"), ([[1.0, 2.0]], "tensor")])
def test_bad_features_are_refused(x, message):
    with pytest.raises(ValueError, match=message):
        ops.moments(x)


def test_non_finite_features_are_refused_on_cpu():
    x = torch.ones(2, 3, 4)
    x[1, 2, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        ops.moments(x)


def test_kernels_compile_for_hopper():
    """The GPU build (not the interpreter) of both kernels, fp32 and bf16 features, both passes,
    orders 1, 2 and 4."""
    builds = []
    for dtype in ("fp32", "bf16"):
        types = {"*pointer": "*fp32", "*scalar": "i32", "x_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}"}
        builds.append(("_power_sums_kernel", types,
                       dict(CENTRED=False, FIRST=1, LAST=1, POWER_ROWS=1, BLOCK_N=32, BLOCK_D=128)))
        builds.append(("_power_sums_kernel", types,
                       dict(CENTRED=True, FIRST=2, LAST=4, POWER_ROWS=4, BLOCK_N=32, BLOCK_D=128)))
        for order in (1, 2, 4):
            builds.append(("_moments_backward_kernel", types, dict(ORDER=order, BLOCK_N=32, BLOCK_D=128)))
    assert_compiles_for_hopper("condense_engine.kernels.moments", builds)
