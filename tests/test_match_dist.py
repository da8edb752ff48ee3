"""ops.match_dist: the Triton kernels (interpreter on CPU) against the per-layer reference, the
reference against closed forms and the published "mse"/"cos" variants, and input validation."""
import pytest
import torch

from condense_engine import ops
from condense_engine.kernels import match_dist as kernel
from condense_engine.reference import match_dist as reference
from tests.hopper_compile import assert_compiles_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# A small ConvNet-like parameter list with odd sizes: conv (out, in, k, k) + bias, a 3-D
# LayerNorm weight + bias, and a linear layer + bias.
NET_SHAPES = [(5, 3, 3, 3), (5,), (7, 5, 3, 3), (7,), (7, 3, 3), (7, 3, 3), (4, 63), (4,)]


def _grads(shapes, classes=None, seed=0, dtype=torch.float32):
    """Correlated real/synthetic gradient lists; synthetic ones require grad."""
    g = torch.Generator().manual_seed(seed)
    lead = () if classes is None else (classes,)
    real = [torch.randn(*lead, *s, generator=g) for s in shapes]
    syn = [(0.6 * r + 0.8 * torch.randn(r.shape, generator=g)) for r in real]
    real = [r.to(DEVICE, dtype).requires_grad_() for r in real]
    syn = [s.to(DEVICE, dtype).requires_grad_() for s in syn]
    return real, syn


def _value_and_grads(real, syn, backend, **options):
    out = ops.match_dist(real, syn, backend=backend, **options)
    grads = torch.autograd.grad(out, real + syn, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(real + syn, grads)]


def _assert_triton_matches_reference(real, syn, rtol=1e-5, atol=1e-6, **options):
    ours, our_grads = _value_and_grads(real, syn, "triton", **options)
    want, want_grads = _value_and_grads(real, syn, "torch", **options)
    assert ours.dtype == torch.float32 and ours.shape == ()
    torch.testing.assert_close(ours, want, rtol=rtol, atol=atol)
    for got, expected in zip(our_grads, want_grads):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("batched", [False, True])
def test_triton_matches_reference(batched):
    real, syn = _grads(NET_SHAPES, classes=3 if batched else None)
    _assert_triton_matches_reference(real, syn, batched=batched)


@pytest.mark.parametrize("block_r,block_k", [(1, 16), (4, 8), (16, 64)])
def test_triton_tiles_split_rows_and_columns(block_r, block_k):
    """Row blocks straddle layers of different row lengths, rows span several column chunks."""
    real, syn = _grads([(3, 37), (5, 2, 5), (2, 129), (9, 1)], classes=2, seed=1)
    expected = reference.match_dist(real, syn, batched=True)
    got = kernel.layerwise_cosine_distance(real, syn, 2, reference.NORM_EPS, block_r, block_k)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    expected_grads = torch.autograd.grad(expected, real + syn)
    got_grads = torch.autograd.grad(got, real + syn)
    for ours, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_zero_rows_match_torch_norm_gradient():
    """A zero synthetic (or real) row: the cosine is 0 and torch's norm has gradient 0 there."""
    real, syn = _grads([(4, 6), (3, 5)], seed=2)
    with torch.no_grad():
        syn[0][1].zero_()
        real[1][2].zero_()
    _assert_triton_matches_reference(real, syn)


def test_only_synthetic_side_differentiable():
    real, syn = _grads(NET_SHAPES, seed=3)
    real = [r.detach() for r in real]
    out = ops.match_dist(real, syn, backend="triton")
    got = torch.autograd.grad(out, syn, allow_unused=True)
    want = torch.autograd.grad(ops.match_dist(real, syn, backend="torch"), syn, allow_unused=True)
    for ours, expected, s in zip(got, want, syn):
        if s.dim() < 2:
            assert ours is None and expected is None
        else:
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_half_precision_inputs():
    real, syn = _grads(NET_SHAPES, classes=2, seed=4, dtype=torch.bfloat16)
    _assert_triton_matches_reference(real, syn, rtol=2e-2, atol=2e-3, batched=True)


def test_reference_closed_forms():
    weight = torch.randn(4, 3, 3, 3)
    bias = torch.randn(4)
    # Identical gradients: cos = 1 per row (up to eps); opposite ones: 2 per row; biases ignored.
    assert float(reference.match_dist([weight, bias], [weight, -bias])) == pytest.approx(0.0, abs=1e-5)
    assert float(reference.match_dist([weight, bias], [-weight, bias])) == pytest.approx(8.0, abs=1e-5)
    # The eps sits in the denominator: a scaled copy gives 1 − ‖a‖²·2/(‖a‖·‖2a‖ + 1e-6) per row.
    row_sq = weight.reshape(4, -1).pow(2).sum(-1).double()
    expected = (1 - 2 * row_sq / (2 * row_sq + 1e-6)).sum()
    assert float(reference.match_dist([weight], [2 * weight])) == pytest.approx(float(expected), abs=1e-6)


def test_reference_mse_l1_and_cos_use_every_parameter():
    real, syn = _grads([(3, 4), (3,)], seed=5)
    flat_real = torch.cat([g.reshape(-1) for g in real])
    flat_syn = torch.cat([g.reshape(-1) for g in syn])
    mse = ops.match_dist(real, syn, metric="mse")
    cos = ops.match_dist(real, syn, metric="cos")
    torch.testing.assert_close(mse, (flat_syn - flat_real).pow(2).sum())
    torch.testing.assert_close(ops.match_dist(real, syn, metric="l1"), (flat_syn - flat_real).abs().sum())
    cosine = (flat_real @ flat_syn) / (flat_real.norm() * flat_syn.norm() + 1e-6)
    torch.testing.assert_close(cos, 1 - cosine)
    per_class = [_grads([(3, 4), (3,)], seed=s) for s in (6, 7)]
    stacked_real = [torch.stack([pc[0][i] for pc in per_class]) for i in range(2)]
    stacked_syn = [torch.stack([pc[1][i] for pc in per_class]) for i in range(2)]
    batched = ops.match_dist(stacked_real, stacked_syn, metric="cos", batched=True)
    torch.testing.assert_close(batched, sum(ops.match_dist(r, s, metric="cos") for r, s in per_class))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_is_the_sum_over_classes(backend):
    real, syn = _grads(NET_SHAPES, classes=3, seed=8)
    batched = ops.match_dist(real, syn, batched=True, backend=backend)
    looped = sum(ops.match_dist([g[c] for g in real], [g[c] for g in syn], backend=backend) for c in range(3))
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_and_one_dimensional_lists_give_zero(backend):
    assert float(ops.match_dist([], [], backend=backend)) == 0.0
    real, syn = _grads([(5,), (3,)], seed=9)
    out = ops.match_dist(real, syn, backend=backend)
    assert out.shape == () and float(out) == 0.0
    real, syn = _grads([(5,), (3,)], classes=2, seed=9)
    out = ops.match_dist(real, syn, batched=True, backend=backend)
    assert out.shape == () and float(out) == 0.0


def test_bad_input():
    real, syn = _grads([(3, 4), (3,)])
    with pytest.raises(ValueError, match="grads_real has 2 tensors but grads_syn has 1"):
        ops.match_dist(real, syn[:1])
    with pytest.raises(ValueError, match=r"grads_syn\[0\] has shape \(4, 3\)"):
        ops.match_dist(real, [syn[0].t(), syn[1]])
    with pytest.raises(ValueError, match="list or tuple"):
        ops.match_dist(real[0], syn[0])
    with pytest.raises(ValueError, match=r"grads_syn\[1\] must be a tensor"):
        ops.match_dist(real, [syn[0], 3.0])
    with pytest.raises(ValueError, match=r"grads_real\[0\] must be float32"):
        ops.match_dist([torch.ones(3, 4, dtype=torch.int64), real[1]], syn)
    with pytest.raises(ValueError, match="metric"):
        ops.match_dist(real, syn, metric="l2")
    with pytest.raises(ValueError, match="class dimension"):
        ops.match_dist([torch.ones(2, 3, 4), torch.ones(3, 4)], [torch.ones(2, 3, 4), torch.ones(3, 4)],
                       batched=True)
    with pytest.raises(RuntimeError, match="no 'triton' backend"):
        ops.match_dist(real, syn, metric="mse", backend="triton")


def test_row_layout_offsets():
    start, length = kernel.row_layout(((2, 3), (3, 1), (1, 4)), torch.device("cpu"))
    assert start.tolist() == [0, 3, 6, 7, 8, 9]
    assert length.tolist() == [3, 3, 1, 1, 1, 4]


def test_kernels_compile_for_hopper():
    """The GPU build (not the interpreter) of both kernels in fp32 and bf16, each gradient side."""
    builds = []
    for dtype in ("fp32", "bf16"):
        types = {"*pointer": "*fp32", "*scalar": "i32", "eps": "fp32", "row_start_ptr": "*i64",
                 "row_length_ptr": "*i32",
                 **{name: f"*{dtype}" for name in ("real_ptr", "syn_ptr", "grad_real_ptr", "grad_syn_ptr")}}
        builds.append(("_row_cosine_forward_kernel", types, dict(BLOCK_R=4, BLOCK_K=256)))
        builds += [("_row_cosine_backward_kernel", types,
                    dict(NEED_REAL=need_real, NEED_SYN=not need_real, BLOCK_R=4, BLOCK_K=256))
                   for need_real in (True, False)]
    assert_compiles_for_hopper("condense_engine.kernels.match_dist", builds)
