"""M3D / ECHO: kernel-MMD distribution matching, multi-formation init, several updates per net."""
import pytest
import torch

import condense_engine as ce
from condense_engine import ops
from condense_engine.methods.dm import DM, M3D, moment_matching_loss
from condense_engine.models import ConvNetBank, layers
from condense_engine.reference import mmd as reference_mmd
from tests.toy_data import FAST, toy_dataset


def _loss_before_and_after(loss, **options) -> tuple[float, float]:
    """loss(real (3, 24, d), syn (3, 2, d)) summed over 4 fresh nets, for the toy set's initial
    synthetic images and for them after 25 M3D iterations with `options`."""
    data = toy_dataset()
    init = ce.distill(data, method="m3d", ipc=2, iterations=0, progress=False, device="cpu", **options)
    syn = ce.distill(data, method="m3d", ipc=2, iterations=25, progress=False, device="cpu", **options)
    real = torch.cat([data.normalized()[data.labels == c][:24] for c in range(3)])
    before = after = 0.0
    for seed in range(4):
        bank = ConvNetBank(1, channel=1, width=32, im_size=(12, 12), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            feats = [bank.embed(x)[0] for x in (real, init.images, syn.images)]
        target = feats[0].view(3, 24, -1)
        before += float(loss(target, feats[1].view(3, 2, -1)))
        after += float(loss(target, feats[2].view(3, 2, -1)))
    return before, after


@pytest.mark.parametrize("kernel", ["gaussian", "poly"])
def test_m3d_lowers_its_kernel_mmd(kernel):
    before, after = _loss_before_and_after(
        lambda real, syn: ops.mmd(real, syn, kernel=kernel, degree=3, include_xx=False),
        **dict(FAST, dsa=False, kernel=kernel, lr_img=1.0 if kernel == "gaussian" else 0.1))
    assert after < before


def test_multi_formation_is_the_default_below_ipc_50_only():
    assert M3D("fashion-mnist", 10).options["factor"] == 2
    assert M3D("fashion-mnist", 50).options["factor"] == 1 and M3D("cifar10", 100).options["factor"] == 1
    assert M3D("cifar10", 100).options["lr_img"] == 10.0  # DM's own overrides still apply
    assert M3D("mnist", 50, factor=2).options["factor"] == 2


def test_echo_is_an_alias():
    data = toy_dataset()
    syn = ce.distill(data, method="echo", ipc=1, iterations=1, progress=False, device="cpu", **FAST)
    assert syn.meta["method"] == "m3d"


def test_multi_formation_factor_two():
    data = toy_dataset(per_class=24)
    syn = ce.distill(data, method="m3d", ipc=2, iterations=2, progress=False, device="cpu", factor=2, **FAST)
    assert syn.factor == 2 and syn.images.shape == (6, 1, 12, 12)
    images, labels = syn.materialize()
    assert images.shape == (24, 1, 12, 12)
    assert labels.tolist() == [c for c in range(3) for _ in range(8)]
    with pytest.raises(ValueError, match="divide"):
        ce.distill(toy_dataset(size=13), method="m3d", ipc=1, iterations=1, progress=False, device="cpu", factor=2, **FAST)


def test_model_steps_reuses_the_network(monkeypatch):
    built = []
    original = ConvNetBank.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ConvNetBank, "__init__", counting)
    ce.distill(toy_dataset(), method="m3d", ipc=1, iterations=6, progress=False, device="cpu", model_steps=3, **FAST)
    assert len(built) == 2


def test_defaults_documented_and_overridable():
    method = M3D("mnist", 10)
    assert method.options["kernel"] == "gaussian" and method.options["factor"] == 2 and method.options["normalize"]
    assert M3D("mnist", 10, kernel="poly", degree=2).kernel_options == dict(kernel="poly", include_xx=False, degree=2)


def test_explicit_moments_default_to_mean_and_variance_and_poly_keeps_degree_3():
    assert M3D("mnist", 10, kernel="moments").options["degree"] == M3D.MOMENTS_DEGREE == 2
    assert M3D("mnist", 10, kernel="moments", degree=4).options["degree"] == 4
    assert M3D("mnist", 10, kernel="poly").options["degree"] == 3
    with pytest.raises(ValueError, match=r"degree must be an int \(default 2\), got 'two'"):
        M3D("mnist", 10, kernel="moments", degree="two")


def _syn_gradient(method, real, syn):
    syn = syn.clone().requires_grad_(True)
    method.feature_loss(real, syn).backward()
    return syn.grad


@pytest.mark.parametrize("options", [dict(kernel="poly", degree=1), dict(kernel="gaussian", sigmas=[1e4, 2e4])])
def test_normalized_kernel_loss_moves_pixels_like_dm(options):
    """Normalised, a kernel whose higher-order terms vanish gives DM's gradient, so lr_img carries over."""
    generator = torch.Generator().manual_seed(0)
    real, syn = torch.randn(2, 16, 8, generator=generator), torch.randn(2, 3, 8, generator=generator)
    expected = _syn_gradient(ce.methods.get_method("dm")("mnist", 3), real, syn)
    got = _syn_gradient(M3D("mnist", 3, **options), real, syn)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)
    raw = _syn_gradient(M3D("mnist", 3, normalize=False, **options), real, syn)
    assert raw.abs().max() < 0.2 * expected.abs().max()


@pytest.mark.parametrize("kernel", ["gaussian", "poly", "linear"])
def test_first_order_weight_is_the_kernel_slope_at_the_data(kernel):
    """Shift a copy of the real features by ε·v: the kernel MMD² is ≈ w·ε²·‖v‖² (high d, small ε)."""
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(1, 128, 256, generator=generator, dtype=torch.float64) + 1.0
    shift = 1e-2 * torch.randn(256, generator=generator, dtype=torch.float64)
    method = M3D("mnist", 3, kernel=kernel, degree=3)
    sigmas = reference_mmd.default_sigmas(real) if kernel == "gaussian" else None
    mmd = reference_mmd.mmd(real, real + shift, kernel, degree=3, gamma=None, coef0=1.0, sigmas=sigmas,
                            estimator="biased", include_xx=True, reduction="sum")
    slope = float(mmd) / float(shift.pow(2).sum())
    assert slope == pytest.approx(float(method.first_order_weight(real)), rel=0.1)


@pytest.mark.parametrize("method,options", [
    (DM, {}), (M3D, {}), (M3D, dict(kernel="poly")), (M3D, dict(sigmas=(2.0, 5.0))), (M3D, dict(normalize=False)),
    (M3D, dict(kernel="moments"))])
def test_class_groups_give_the_one_pass_loss_and_gradient(method, options, monkeypatch):
    """backward_loss in groups of classes (forced by a tiny activation bound) equals one pass."""
    m = method("toy", 2, **dict(FAST, **options))
    m.num_classes = 5
    bank = ConvNetBank(2, channel=1, width=8, im_size=(12, 12), generator=torch.Generator().manual_seed(0))
    bank.requires_grad_(False)
    real = torch.randn(5 * 6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    pixels = torch.randn(5 * 2, 1, 12, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    embedded = []
    embed = bank.embed
    monkeypatch.setattr(bank, "embed", lambda x: embedded.append(len(x)) or embed(x))
    results = []
    # 2 classes × 2 images × SAVED_PER_SYN_IMAGE × 2 nets × width 8 × 12 × 12 fp32: 2 classes a pass
    for bound in (layers.CPU_ACTIVATION_BYTES, 2 * 2 * 2 * 2 * 8 * 12 * 12 * 4):
        monkeypatch.setattr(layers, "CPU_ACTIVATION_BYTES", bound)
        pixels.grad = None
        loss = m.backward_loss(bank, real, pixels * 1.5, 2)
        results.append((loss, pixels.grad.clone()))
    assert embedded == [30, 10, 30, 4, 4, 2]
    (whole, whole_grad), (grouped, grouped_grad) = results
    assert whole_grad.abs().sum() > 0
    torch.testing.assert_close(grouped, whole)
    torch.testing.assert_close(grouped_grad, whole_grad)


def test_moment_matching_loss_is_its_definition():
    """Σ_c ‖Δμ‖² + ‖Δvar‖²/(2v) + ‖Δm₃‖²/(6v²), v the class's mean real variance, by hand in float64."""
    generator = torch.Generator().manual_seed(3)
    real = torch.randn(2, 40, 6, generator=generator).exp()
    syn = torch.randn(2, 5, 6, generator=generator)
    expected = 0.0
    for r, y in zip(real.double(), syn.double()):
        v = r.var(0, unbiased=False).mean()
        centred_r, centred_y = r - r.mean(0), y - y.mean(0)
        expected += (r.mean(0) - y.mean(0)).pow(2).sum()
        expected += (centred_r.pow(2).mean(0) - centred_y.pow(2).mean(0)).pow(2).sum() / (2 * v)
        expected += (centred_r.pow(3).mean(0) - centred_y.pow(3).mean(0)).pow(2).sum() / (6 * v ** 2)
    torch.testing.assert_close(moment_matching_loss(real, syn, 3), expected.float(), rtol=1e-4, atol=1e-6)


def test_moment_matching_is_in_squared_feature_units_and_starts_from_dm():
    """Scaling every feature by a scales the loss by a² (so DM's lr_img carries over), and order 1
    is DM's loss and gradient."""
    generator = torch.Generator().manual_seed(4)
    real, syn = torch.randn(2, 16, 8, generator=generator).exp(), torch.randn(2, 3, 8, generator=generator)
    method = M3D("mnist", 3, kernel="moments", degree=4)
    torch.testing.assert_close(method.feature_loss(7.0 * real, 7.0 * syn), 49.0 * method.feature_loss(real, syn))
    expected = _syn_gradient(DM("mnist", 3), real, syn)
    torch.testing.assert_close(_syn_gradient(M3D("mnist", 3, kernel="moments", degree=1), real, syn), expected)


def test_m3d_with_explicit_moments_lowers_its_loss():
    before, after = _loss_before_and_after(lambda real, syn: moment_matching_loss(real, syn, 3),
                                           **dict(FAST, dsa=False, kernel="moments", degree=3, factor=1))
    assert after < 0.9 * before


def test_unknown_kernel_is_refused_before_the_first_step():
    with pytest.raises(ValueError, match="kernel must be one of"):
        ce.distill(toy_dataset(), method="m3d", ipc=1, iterations=0, progress=False, device="cpu", kernel="laplace",
                   **FAST)  # no step runs: the refusal comes from init
