"""ops.dsa's Triton backend (kernels/augment.py) against the reference chain: forward, gradient
and second derivative, each group alone and all together, odd sizes, 1 and 3 channels, fp32 and
half precision, Siamese and mode-"M" parameters, and the errors. On a CPU the kernels run in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay tiny."""
import dataclasses

import pytest
import torch

from condense_engine import ops
from condense_engine.ops.dsa import GROUPS, DSAParams, native_arguments
from tests.hopper_compile import assert_compiles_for_hopper

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(group,) for group in GROUPS] + [GROUPS, ("color", "crop", "flip", "rotate")]


def _params(n, size, groups=GROUPS, seed=0, **changes):
    """Independent per-sample values from the published distributions, restricted to `groups`."""
    params = DSAParams.sample(n, size=size, mode="M", siamese=False, seed=seed, device=DEVICE)
    return dataclasses.replace(params, ops=tuple(groups), **changes)


def _output_and_grad(x, params, weight, run):
    """run(leaf, params) and the gradient of Σ weight·output w.r.t. the leaf."""
    leaf = x.clone().requires_grad_()
    out = run(leaf, params)
    (out.float() * weight).sum().backward()
    return out.detach(), leaf.grad


def _triton(x, params):
    return ops.dsa(x, params, backend="triton")


def _reference(x, params):
    return ops.dsa(x, params, backend="torch")


def _assert_matches_reference(x, params, run=_triton, tolerance=2e-5):
    weight = torch.randn(x.shape, device=x.device)
    out, grad = _output_and_grad(x, params, weight, run)
    expected_out, expected_grad = _output_and_grad(x, params, weight, _reference)
    assert out.dtype == x.dtype and grad.dtype == x.dtype
    torch.testing.assert_close(out, expected_out, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad, expected_grad, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("groups", CASES, ids="+".join)
@pytest.mark.parametrize("channels,size,align_corners", [(3, (7, 9), True), (1, (6, 5), False)])
def test_matches_reference(groups, channels, size, align_corners):
    x = torch.randn(3, channels, *size, device=DEVICE)
    params = _params(3, size, groups, seed=channels + size[1], align_corners=align_corners)
    _assert_matches_reference(x, params)


@pytest.mark.parametrize("groups", [("color", "cutout"), ("crop", "flip"), GROUPS], ids="+".join)
def test_several_pixel_blocks_per_image(groups):
    """Blocks of 16 output pixels: a 7×9 image spans four programs, the last one partial."""
    from condense_engine.kernels import augment

    x = torch.randn(1, 3, 7, 9, device=DEVICE)
    params = _params(1, (7, 9), groups, seed=3)
    _assert_matches_reference(
        x, params, run=lambda t, p: augment.dsa(t, *native_arguments(p, t), block=16))


def test_image_mean_and_epilogue_over_several_chunks():
    """3·24·24 = 1728 values per image: the mean and the backward's last kernel loop."""
    x = torch.randn(2, 3, 24, 24, device=DEVICE) + 0.5
    _assert_matches_reference(x, _params(2, (24, 24), ("color", "crop"), seed=9))


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid")
@pytest.mark.parametrize("size", [(1, 5), (4, 1)])
@pytest.mark.parametrize("align_corners", [True, False])
def test_single_row_or_column_resampling(size, align_corners):
    x = torch.randn(2, 2, *size, device=DEVICE)
    params = _params(2, size, ("scale", "rotate"), seed=2, align_corners=align_corners)
    _assert_matches_reference(x, params)


def test_cutout_larger_and_translate_outside_exactly():
    x = torch.rand(2, 3, 5, 6, device=DEVICE)
    params = DSAParams(ops=("crop", "cutout"), cutout_size=6,
                       translate=torch.tensor([[6, 0], [-2, 7]], device=DEVICE),
                       cutout_center=torch.tensor([[0, 6], [5, 0]], device=DEVICE))
    torch.testing.assert_close(_triton(x, params), _reference(x, params), rtol=0, atol=0)


def test_hand_built_rotation_quarter_turn():
    """A 90° rotation of a 3×3 image with align_corners moves pixels exactly (interior taps
    with weight 1): the centre stays, corners rotate."""
    x = torch.arange(9.0, device=DEVICE).reshape(1, 1, 3, 3)
    params = DSAParams(ops=("rotate",), rotate=torch.tensor([torch.pi / 2], device=DEVICE))
    out = _triton(x, params)
    torch.testing.assert_close(out, _reference(x, params), rtol=1e-6, atol=1e-5)
    assert out[0, 0, 1, 1].item() == pytest.approx(4.0, abs=1e-5)
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [("color",), ("flip", "scale"), GROUPS], ids="+".join)
def test_half_precision_inputs(dtype, groups):
    """Half-precision in and out, fp32 maths inside: close to the reference, which also
    computes in fp32 and casts at the end."""
    x = torch.randn(2, 3, 7, 9, device=DEVICE).to(dtype)
    _assert_matches_reference(x, _params(2, (7, 9), groups, seed=8), tolerance=3e-2)


def test_siamese_real_and_synthetic_batches_share_one_transform():
    real = torch.randn(4, 3, 7, 9, device=DEVICE)
    synthetic = torch.randn(2, 3, 7, 9, device=DEVICE)
    kwargs = dict(strategy="color_crop_cutout_flip_scale_rotate", size=(7, 9), mode="M",
                  siamese=True, seed=11, device=DEVICE)
    real_params = DSAParams.sample(4, **kwargs)
    synthetic_params = DSAParams.sample(2, **kwargs)
    real[1] = synthetic[0]
    real_out = _triton(real, real_params)
    torch.testing.assert_close(real_out, _reference(real, real_params), rtol=2e-5, atol=2e-5)
    # The same image in both batches gets the same augmented result.
    torch.testing.assert_close(real_out[1], _triton(synthetic, synthetic_params)[0],
                               rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_mode_m_and_mode_s(seed):
    size = (9, 7)
    x = torch.randn(3, 3, *size, device=DEVICE)
    for mode in ("M", "S"):
        params = DSAParams.sample(3, size=size, mode=mode, seed=seed, device=DEVICE)
        _assert_matches_reference(x, params)


@pytest.mark.parametrize("groups", [("color",), GROUPS], ids="+".join)
def test_second_derivative_matches_reference(groups):
    """Differentiating the backward (as gradient matching does through a network) gives the
    reference's result. The backward is grad_x = Jᵀ·grad_out, so its derivative w.r.t. grad_out
    along a probe is J·probe, and the chain is affine in x: J·probe = f(probe) − f(0) for the
    reference forward f (brightness is the constant part). That expectation needs no double
    backward of grid_sample, which torch 2.11 (the GPU machine's) lacks."""
    x = torch.randn(2, 3, 6, 7, device=DEVICE)
    params = _params(2, (6, 7), groups, seed=4)
    grad_out = torch.randn_like(x).requires_grad_()
    probe = torch.randn_like(x)
    leaf = x.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(_triton(leaf, params), leaf, grad_out, create_graph=True)
    (second,) = torch.autograd.grad((grad_x * probe).sum(), grad_out)
    expected_grad_x = _output_and_grad(x, params, grad_out.detach(), _reference)[1]
    expected_second = _reference(probe, params) - _reference(torch.zeros_like(probe), params)
    torch.testing.assert_close(grad_x.detach(), expected_grad_x, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(second, expected_second, rtol=2e-5, atol=2e-5)


def test_published_style_benchmark_baseline_equals_reference():
    """bench/dsa.py times the published-style chain against ours: it must do the same work."""
    from bench.baselines.dsa_published import published_dsa

    x = torch.randn(3, 3, 7, 9, device=DEVICE)
    for seed in range(3):
        params = _params(3, (7, 9), seed=seed)
        torch.testing.assert_close(published_dsa(x, params.to("cpu")), _reference(x, params),
                                   rtol=1e-5, atol=1e-5)


def test_empty_group_list_is_identity():
    x = torch.randn(2, 3, 5, 4, device=DEVICE)
    out = _triton(x, DSAParams(ops=()))
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_bad_input_still_raises_value_error():
    params = _params(2, (7, 9))
    with pytest.raises(ValueError, match="x must be"):
        _triton(torch.zeros(2, 3, 7, 9, dtype=torch.int64, device=DEVICE), params)
    with pytest.raises(ValueError, match=r"\(2,"):
        _triton(torch.randn(3, 3, 7, 9, device=DEVICE), params)
    with pytest.raises(ValueError, match="order"):
        _triton(torch.randn(2, 3, 7, 9, device=DEVICE),
                dataclasses.replace(params, ops=("rotate", "color")))


def test_float64_is_not_a_triton_input():
    with pytest.raises(RuntimeError, match="triton"):
        _triton(torch.randn(2, 3, 7, 9, dtype=torch.float64, device=DEVICE), _params(2, (7, 9)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _triton(torch.randn(2, 3, 7, 9), _params(2, (7, 9)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_is_the_automatic_choice_on_cuda(monkeypatch):
    from condense_engine.kernels import augment

    calls = []
    monkeypatch.setattr(augment, "dsa", lambda x, *rest, **options: calls.append(x) or x)
    monkeypatch.delenv("CONDENSE_BACKEND", raising=False)
    ops.dsa(torch.randn(2, 3, 7, 9, device="cuda"), _params(2, (7, 9)))
    assert len(calls) == 1


def test_kernels_compile_for_hopper():
    """The GPU build (not the interpreter) of the mean, the forward and backward with no group,
    every group, and the bilinear taps alone, in fp32 and bf16, and the backward's epilogue."""
    steps = {name: "fp32" for name in ("step_x", "start_x", "half_x", "step_y", "start_y", "half_y")}
    groups = [dict(COLOR=False, CROP=False, CUTOUT=False, FLIP=False, SCALE_TAPS=1, ROTATE_TAPS=1),
              dict(COLOR=True, CROP=True, CUTOUT=True, FLIP=True, SCALE_TAPS=4, ROTATE_TAPS=4),
              dict(COLOR=False, CROP=False, CUTOUT=False, FLIP=False, SCALE_TAPS=4, ROTATE_TAPS=1)]
    builds = []
    for dtype in ("fp32", "bf16"):
        data = {"*pointer": "*fp32", "*scalar": "i32", "shifts_ptr": "*i64", **steps}
        builds.append(("_image_mean_kernel", {**data, "x_ptr": f"*{dtype}"}, dict(BLOCK=1024)))
        builds.append(("_finish_backward_kernel", {**data, "grad_in_ptr": f"*{dtype}"}, dict(BLOCK=1024)))
        for chosen in groups:
            tile = dict(chosen, BLOCK_C=4, BLOCK_P=256)
            builds.append(("_dsa_forward_kernel", {**data, "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}, tile))
            builds.append(("_dsa_backward_kernel", {**data, "grad_out_ptr": f"*{dtype}"}, tile))
    assert_compiles_for_hopper("condense_engine.kernels.augment", builds)
