"""ops.dsa and DSAParams: each group against hand-computed values, sampling, Siamese sharing,
gradients, validation, and the native kernels (CPU, and CUDA where present) against the
reference."""
import dataclasses
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from condense_engine import ops
from condense_engine._extension import has_native
from condense_engine.ops.dsa import (GROUPS, NATIVE_DEVICES, DSAParams, counter_uniform,
                                     default_strategy, native_dsa)


def _params(ops_, n=1, **fields):
    """Hand-built params: `fields` as given, tensors made from lists."""
    converted = {}
    for name, value in fields.items():
        if name in ("cutout_size", "align_corners"):
            converted[name] = value
        elif name in ("translate", "cutout_center"):
            converted[name] = torch.tensor(value, dtype=torch.int64).reshape(n, 2)
        elif name == "flip":
            converted[name] = torch.tensor(value, dtype=torch.bool).reshape(n)
        else:
            converted[name] = torch.tensor(value, dtype=torch.float32).reshape(n, -1).squeeze(1)
    return DSAParams(ops=tuple(ops_), **converted)


def _backends():
    return ["torch"] + (["native"] if has_native("dsa", "cpu") is None else [])


@pytest.fixture(params=_backends())
def each_backend(request):
    """Run the test once per backend available on CPU (forced with ops.set_backend)."""
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)


every_backend = pytest.mark.usefixtures("each_backend")


def _full_params(n, seed=0):
    """Every group, independent per-sample values, published distributions."""
    return DSAParams.sample(n, size=(7, 9), mode="M", siamese=False, seed=seed)


# ---------------------------------------------------------------- each group by hand

@every_backend
def test_translate_by_hand():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    out = ops.dsa(x, _params(["crop"], translate=[1, -2]))
    expected = torch.tensor([[0, 0, 4, 5], [0, 0, 8, 9], [0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=0)


@every_backend
def test_translate_is_per_sample():
    x = torch.arange(12.0).reshape(1, 1, 3, 4).repeat(2, 1, 1, 1)
    out = ops.dsa(x, _params(["crop"], n=2, translate=[[0, 0], [-1, 1]]))
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=0)
    expected = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 0], [5, 6, 7, 0]], dtype=torch.float32)
    torch.testing.assert_close(out[1, 0], expected, rtol=0, atol=0)


@every_backend
@pytest.mark.parametrize("center,side,rows,cols", [
    ((1, 4), 3, (0, 3), (3, 6)),    # rows 0..2, cols 3..5
    ((1, 4), 2, (0, 2), (3, 5)),    # even side: centre - 1 .. centre
    ((0, 0), 3, (0, 2), (0, 2)),    # clipped at the top-left corner
    ((5, 6), 4, (3, 5), (4, 6)),    # centre just outside, clipped at the bottom-right
])
def test_cutout_by_hand(center, side, rows, cols):
    x = torch.ones(1, 2, 5, 6)
    out = ops.dsa(x, _params(["cutout"], cutout_center=list(center), cutout_size=side))
    expected = torch.ones(1, 2, 5, 6)
    expected[:, :, rows[0]:rows[1], cols[0]:cols[1]] = 0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@every_backend
def test_cutout_default_side_is_half_the_height():
    params = _params(["cutout"], cutout_center=[3, 3])
    out = ops.dsa(torch.ones(1, 1, 7, 7), params)
    assert int((out == 0).sum()) == 4 * 4   # int(0.5 * 7 + 0.5) = 4


@every_backend
def test_flip_by_hand():
    x = torch.arange(24.0).reshape(2, 1, 3, 4)
    out = ops.dsa(x, _params(["flip"], n=2, flip=[True, False]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(out[1], x[1], rtol=0, atol=0)


@every_backend
def test_brightness_alone_adds():
    x = torch.rand(2, 3, 4, 5)
    params = _params(["color"], n=2, brightness=[0.25, -0.5], saturation=[1.0, 1.0],
                     contrast=[1.0, 1.0])
    out = ops.dsa(x, params)
    torch.testing.assert_close(out[0], x[0] + 0.25)
    torch.testing.assert_close(out[1], x[1] - 0.5)


@every_backend
def test_saturation_by_hand():
    x = torch.tensor([1.0, 2.0, 6.0]).view(1, 3, 1, 1)      # channel mean 3
    params = _params(["color"], brightness=[0.0], saturation=[0.5], contrast=[1.0])
    out = ops.dsa(x, params)
    torch.testing.assert_close(out.flatten(), torch.tensor([2.0, 2.5, 4.5]))


@every_backend
def test_contrast_by_hand():
    x = torch.tensor([0.0, 1.0, 2.0, 5.0]).view(1, 1, 2, 2)  # image mean 2
    params = _params(["color"], brightness=[0.0], saturation=[1.0], contrast=[1.5])
    out = ops.dsa(x, params)
    torch.testing.assert_close(out.flatten(), torch.tensor([-1.0, 0.5, 2.0, 6.5]))


@every_backend
def test_color_order_brightness_saturation_contrast():
    x = torch.rand(1, 3, 2, 3)
    b, s, c = 0.3, 1.7, 0.6
    out = ops.dsa(x, _params(["color"], brightness=[b], saturation=[s], contrast=[c]))
    y = x + b
    y = (y - y.mean(1, keepdim=True)) * s + y.mean(1, keepdim=True)
    y = (y - y.mean()) * c + y.mean()
    torch.testing.assert_close(out, y)


@every_backend
def test_scale_by_hand():
    x = torch.arange(5.0).repeat(2, 1).view(1, 1, 2, 5)
    out = ops.dsa(x, _params(["scale"], scale=[[0.5, 1.0]]))       # align_corners=True
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))


@every_backend
def test_rotate_quarter_turn_by_hand():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    out = ops.dsa(x, _params(["rotate"], rotate=[math.pi / 2]))
    # grid (x, y) = (-y_out, x_out): out[i, j] = x[j, 2 - i]
    expected = torch.tensor([[2.0, 5.0, 8.0], [1.0, 4.0, 7.0], [0.0, 3.0, 6.0]])
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-5)


@every_backend
@pytest.mark.parametrize("align_corners", [True, False])
def test_scale_and_rotate_equal_grid_sample(align_corners):
    x = torch.rand(2, 3, 6, 7)
    sx, sy, angle = [0.9, 1.15], [1.1, 0.85], [0.2, -0.25]
    scaled = _params(["scale"], n=2, scale=list(zip(sx, sy)), align_corners=align_corners)
    rotated = _params(["rotate"], n=2, rotate=angle, align_corners=align_corners)
    theta_s = torch.tensor([[[sx[k], 0, 0], [0, sy[k], 0]] for k in range(2)])
    a = torch.tensor(angle)
    theta_r = torch.stack([torch.stack([a.cos(), -a.sin(), 0 * a], 1),
                           torch.stack([a.sin(), a.cos(), 0 * a], 1)], 1)
    for params, theta in ((scaled, theta_s), (rotated, theta_r)):
        grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners)
        expected = F.grid_sample(x, grid, align_corners=align_corners)
        torch.testing.assert_close(ops.dsa(x, params), expected)


@every_backend
def test_mode_m_applies_groups_in_order():
    x = torch.rand(3, 3, 7, 9)
    params = _full_params(3, seed=4)
    expected = x
    for group in GROUPS:
        expected = ops.dsa(expected, dataclasses.replace(params, ops=(group,)))
    torch.testing.assert_close(ops.dsa(x, params), expected)


@every_backend
def test_empty_ops_is_identity():
    x = torch.rand(2, 1, 3, 3)
    torch.testing.assert_close(ops.dsa(x, DSAParams(ops=())), x, rtol=0, atol=0)


@every_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [1, 3])
def test_half_precision_follows_float32(dtype, channels):
    x = torch.rand(2, channels, 7, 5)
    params = DSAParams.sample(2, size=(7, 5), mode="M", siamese=False, seed=1)
    out = ops.dsa(x.to(dtype), params)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ops.dsa(x.to(dtype).float(), params),
                               rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("group", GROUPS)
def test_gradcheck_each_group(group):
    params = dataclasses.replace(_full_params(2, seed=7), ops=(group,))
    x = torch.rand(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.dsa(t, params, backend="torch"), (x,))


@every_backend
def test_gradient_of_all_groups_flows():
    x = torch.rand(2, 3, 7, 9, requires_grad=True)
    ops.dsa(x, _full_params(2, seed=3)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- sampling

def _assert_params_equal(a, b):
    assert a.ops == b.ops and a.cutout_size == b.cutout_size
    assert a.tensors().keys() == b.tensors().keys()
    for name, value in a.tensors().items():
        assert torch.equal(value, b.tensors()[name]), name


def test_same_seed_same_params_and_other_seed_differs():
    first = DSAParams.sample(5, mode="M", siamese=False, seed=11)
    _assert_params_equal(first, DSAParams.sample(5, mode="M", siamese=False, seed=11))
    other = DSAParams.sample(5, mode="M", siamese=False, seed=12)
    assert not torch.equal(first.brightness, other.brightness)


def test_seeded_params_do_not_depend_on_batch_size():
    small = DSAParams.sample(4, mode="M", siamese=False, seed=5)
    large = DSAParams.sample(8, mode="M", siamese=False, seed=5)
    prefix = {name: value[:4] for name, value in large.tensors().items()}
    _assert_params_equal(small, dataclasses.replace(large, **prefix))


def test_seeded_sampling_ignores_global_rng():
    torch.manual_seed(1)
    first = DSAParams.sample(3, mode="M", seed=9)
    torch.manual_seed(2)
    _assert_params_equal(first, DSAParams.sample(3, mode="M", seed=9))


def test_counter_uniform_is_a_function_of_the_counter():
    full = counter_uniform(3, 1, 6, 2)
    torch.testing.assert_close(full[:2], counter_uniform(3, 1, 2, 2), rtol=0, atol=0)
    assert full.dtype == torch.float64 and bool((full >= 0).all() and (full < 1).all())
    assert not torch.equal(full, counter_uniform(3, 2, 6, 2))


@pytest.mark.parametrize("source", ["seed", "generator", "global"])
def test_siamese_gives_every_sample_sample_zeros_values(source):
    kwargs = {"seed": 4} if source == "seed" else {}
    if source == "generator":
        kwargs["generator"] = torch.Generator().manual_seed(4)
    params = DSAParams.sample(6, mode="M", **kwargs)
    for name, value in params.tensors().items():
        assert torch.equal(value, value[:1].expand_as(value)), name


@every_backend
def test_siamese_real_and_synthetic_batches_get_one_transform():
    for seed in range(12):
        real = torch.rand(6, 3, 8, 8)
        synthetic = torch.rand(2, 3, 8, 8)
        synthetic[1] = real[4]
        real_params = DSAParams.sample(6, size=(8, 8), seed=seed)
        syn_params = DSAParams.sample(2, size=(8, 8), seed=seed)
        assert real_params.ops == syn_params.ops
        torch.testing.assert_close(ops.dsa(synthetic, syn_params)[1],
                                   ops.dsa(real, real_params)[4], rtol=0, atol=0)


def test_without_siamese_samples_differ():
    params = DSAParams.sample(8, mode="M", siamese=False, seed=2)
    assert len(set(params.brightness.tolist())) == 8


def test_selected_params_transform_those_samples_as_the_whole_batch_does():
    images = torch.randn(6, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    params = DSAParams.sample(6, "color_crop_cutout_flip_scale_rotate", mode="M", size=(9, 9), siamese=False,
                              seed=5)
    index = torch.tensor([4, 1])
    chosen = params.select(index)
    assert chosen.ops == params.ops and chosen.cutout_size == params.cutout_size
    torch.testing.assert_close(ops.dsa(images[index], chosen, backend="torch"),
                               ops.dsa(images, params, backend="torch")[index])


def test_generator_is_reproducible_and_advances():
    gen = torch.Generator().manual_seed(21)
    first = DSAParams.sample(4, mode="M", siamese=False, generator=gen)
    second = DSAParams.sample(4, mode="M", siamese=False, generator=gen)
    assert not torch.equal(first.rotate, second.rotate)
    again = DSAParams.sample(4, mode="M", siamese=False,
                             generator=torch.Generator().manual_seed(21))
    _assert_params_equal(first, again)


def test_global_rng_is_used_without_seed_or_generator():
    torch.manual_seed(8)
    first = DSAParams.sample(4, mode="M", siamese=False)
    torch.manual_seed(8)
    _assert_params_equal(first, DSAParams.sample(4, mode="M", siamese=False))


def test_mode_s_picks_each_group_about_equally():
    counts = Counter(DSAParams.sample(1, seed=seed).ops for seed in range(600))
    assert set(counts) == {(g,) for g in GROUPS}
    assert all(60 <= c <= 140 for c in counts.values()), counts   # 100 ± 4.4 sd


def test_mode_s_fills_only_the_chosen_group():
    params = DSAParams.sample(3, seed=0)
    assert len(params.ops) == 1
    expected = {"color": {"brightness", "saturation", "contrast"}, "crop": {"translate"},
                "cutout": {"cutout_center"}, "flip": {"flip"}, "scale": {"scale"},
                "rotate": {"rotate"}}[params.ops[0]]
    assert set(params.tensors()) == expected


def test_published_distributions_at_32_pixels():
    p = DSAParams.sample(4000, mode="M", siamese=False, seed=0, size=(32, 32))
    assert p.ops == GROUPS and p.cutout_size == 16 and p.align_corners is True
    assert p.brightness.dtype == torch.float32 and p.translate.dtype == torch.int64
    assert -0.5 <= p.brightness.min() and p.brightness.max() < 0.5
    assert abs(float(p.brightness.mean())) < 0.03
    assert 0 <= p.saturation.min() and p.saturation.max() < 2
    assert 0.5 <= p.contrast.min() and p.contrast.max() < 1.5
    assert set(p.translate.flatten().tolist()) == set(range(-4, 5))        # int(0.125*32+.5)=4
    assert set(p.cutout_center.flatten().tolist()) == set(range(0, 33))    # 0..H, even side
    assert 0.45 < float(p.flip.float().mean()) < 0.55
    assert 1 / 1.2 <= p.scale.min() and p.scale.max() <= 1.2
    assert float(p.rotate.abs().max()) <= 15 / 180 * math.pi + 1e-7
    assert float(p.rotate.abs().max()) > 14 / 180 * math.pi


def test_odd_cutout_side_centres_stop_before_h():
    p = DSAParams.sample(2000, "cutout", siamese=False, seed=1, size=(27, 27))
    assert p.cutout_size == 14                         # int(0.5 * 27 + 0.5)
    assert int(p.cutout_center.max()) == 27            # even side: 0..27
    p = DSAParams.sample(2000, "cutout", siamese=False, seed=1, size=(25, 25))
    assert p.cutout_size == 13 and int(p.cutout_center.max()) == 24


def test_sample_device_and_to():
    params = DSAParams.sample(2, mode="M", seed=0, device="cpu")
    assert params.device == torch.device("cpu")
    assert params.to("cpu").device == torch.device("cpu")


@pytest.mark.parametrize("name,expected", [
    ("mnist", "color_crop_cutout_scale_rotate"), ("SVHN", "color_crop_cutout_scale_rotate"),
    ("mnist-default", "color_crop_cutout_scale_rotate"),
    ("fashion_mnist", "color_crop_cutout_flip_scale_rotate"),
    ("cifar10", "color_crop_cutout_flip_scale_rotate"),
])
def test_default_strategy(name, expected):
    assert default_strategy(name) == expected


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("change,match", [
    (dict(ops=("color", "zoom")), "unknown"),
    (dict(ops=("crop", "color")), "order"),
    (dict(ops=("flip", "flip")), "order"),
    (dict(ops="color"), "ops"),
    (dict(translate=torch.zeros(2, 2)), "translate"),
    (dict(translate=torch.zeros(3, 2, dtype=torch.int64)), "translate"),
    (dict(brightness=torch.zeros(2, 1)), "brightness"),
    (dict(flip=torch.zeros(2)), "flip"),
    (dict(scale=None), "scale"),
    (dict(cutout_size=-1), "cutout_size"),
    (dict(cutout_size=100), "cutout_size"),
    (dict(align_corners=1), "align_corners"),
])
def test_bad_params(change, match):
    params = dataclasses.replace(_full_params(2), **change)
    with pytest.raises(ValueError, match=match):
        ops.dsa(torch.rand(2, 3, 7, 9), params)


@pytest.mark.parametrize("x,match", [
    (torch.rand(3, 7, 9), "x must be"),
    (torch.zeros(2, 3, 7, 9, dtype=torch.int64), "x must be"),
    (torch.rand(3, 3, 7, 9), r"\(2,"),
])
def test_bad_images(x, match):
    with pytest.raises(ValueError, match=match):
        ops.dsa(x, _full_params(2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must"), (dict(mode="X"), "mode"), (dict(strategy="rotate_color"), "order"),
    (dict(seed=1, generator=torch.Generator()), "seed or generator"),
])
def test_bad_sample_arguments(kwargs, match):
    kwargs = {"n": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        DSAParams.sample(**kwargs)


# ---------------------------------------------------------------- native backend vs reference

def _native_devices():
    """Devices with native kernels here; CUDA ones are tested even before ops.dsa picks them."""
    devices = [d for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()]
    return [d for d in devices if has_native("dsa", d) is None]


def _run(x, params, backend):
    if backend == "native":
        return native_dsa(x, params.to(x.device))
    return ops.dsa(x, params, backend="torch")


def test_native_is_chosen_only_where_verified():
    assert "cpu" in NATIVE_DEVICES
    if "cuda" not in NATIVE_DEVICES and torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="native"):
            ops.dsa(torch.rand(2, 3, 7, 9, device="cuda"), _full_params(2), backend="native")


def test_native_extension_is_built():
    assert has_native("dsa", "cpu") is None


def test_native_is_the_automatic_choice_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops.condense, "dsa", lambda *args: calls.append(args) or args[0])
    monkeypatch.delenv("CONDENSE_BACKEND", raising=False)
    ops.dsa(torch.rand(2, 3, 7, 9), _full_params(2))
    assert len(calls) == 1


_CASES = [(group,) for group in GROUPS] + [GROUPS, ("color", "crop", "flip", "rotate")]


@pytest.mark.parametrize("device", _native_devices())
@pytest.mark.parametrize("groups", _CASES, ids="+".join)
@pytest.mark.parametrize("channels,size", [(3, (7, 9)), (1, (8, 8)), (3, (5, 4))])
@pytest.mark.parametrize("align_corners", [True, False])
def test_native_matches_reference(device, groups, channels, size, align_corners):
    x = torch.randn(3, channels, *size, device=device)
    params = DSAParams.sample(3, size=size, mode="M", siamese=False, seed=channels * 10 + size[1])
    params = dataclasses.replace(params, ops=groups, align_corners=align_corners)
    weight = torch.randn_like(x)
    results = []
    for backend in ("native", "torch"):
        leaf = x.clone().requires_grad_()
        out = _run(leaf, params, backend)
        (out * weight).sum().backward()
        results.append((out.detach(), leaf.grad))
    (out, grad), (expected_out, expected_grad) = results
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("device", _native_devices())
def test_native_cutout_larger_and_translate_outside(device):
    x = torch.rand(2, 3, 5, 6, device=device)
    params = _params(["crop", "cutout"], n=2, translate=[[6, 0], [-2, 7]],
                     cutout_center=[[0, 6], [5, 0]], cutout_size=6)
    torch.testing.assert_close(_run(x, params, "native"), _run(x, params, "torch"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", _native_devices())
@pytest.mark.parametrize("groups", [("color",), ("scale", "rotate"), GROUPS], ids="+".join)
def test_native_gradcheck_twice(device, groups):
    params = dataclasses.replace(_full_params(2, seed=5), ops=groups)
    x = torch.rand(2, 2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    run = lambda t: _run(t, params, "native")  # noqa: E731
    assert torch.autograd.gradcheck(run, (x,))
    assert torch.autograd.gradgradcheck(run, (x,), fast_mode=True)


@pytest.mark.parametrize("device", _native_devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_half_precision(device, dtype):
    x = torch.randn(2, 3, 7, 9, device=device).to(dtype)
    params = _full_params(2, seed=8)
    leaf = x.clone().requires_grad_()
    out = _run(leaf, params, "native")
    out.float().square().sum().backward()
    assert out.dtype == dtype and leaf.grad.dtype == dtype
    reference_leaf = x.clone().requires_grad_()
    expected = _run(reference_leaf, params, "torch")
    expected.float().square().sum().backward()
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(leaf.grad.float(), reference_leaf.grad.float(), rtol=3e-2, atol=3e-2)
