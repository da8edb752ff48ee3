"""IDC (methods.md §9): multi-formation init, conv-only matching, the pixel-space step and clamp,
CutMix, the per-class cap on decoded images, and a short run that lowers the matching loss."""
import pytest
import torch
import torch.nn.functional as F

import condense_engine as ce
from condense_engine.methods import get_method
from condense_engine.methods.augment import cutmix
from condense_engine.methods.idc import IDC
from condense_engine.models import get_model
from tests.toy_data import toy_dataset

FAST = dict(inner_steps=2, batch_real=8, real_per_epoch=24, batch_net=12, model="ConvNetW32", lr_img=0.05)
RUN = dict(method="idc", ipc=2, seed=0, progress=False, device="cpu")


def test_published_defaults_per_data_set():
    assert get_method("idc") is IDC
    mnist, cifar = IDC("mnist", 10).options, IDC("cifar10", 10).options
    assert (mnist["metric"], mnist["lr_base"], mnist["dsa_strategy"], mnist["cutmix"]) == ("l1", 1e-4, "color_crop", False)
    assert (cifar["metric"], cifar["lr_base"], cifar["real_per_epoch"], cifar["cutmix"]) == ("mse", 5e-3, 2000, True)
    assert IDC("fashion-mnist", 10).options["dsa_strategy"] == "color_crop_cutout"
    assert (mnist["iterations"], mnist["inner_steps"], mnist["factor"], mnist["batch_syn_max"]) == (2000, 100, 2, 128)


def test_cutmix_pastes_one_box_from_a_shuffled_batch_and_reports_the_kept_area():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 16, 16).contiguous()
    labels = torch.arange(4)
    mixed, pasted, kept = cutmix(images, labels, 1.0, torch.Generator().manual_seed(3))
    for i in range(4):
        own = (mixed[i] == i).float().mean().item()
        assert own == pytest.approx(kept) or pasted[i] == i  # an image may be shuffled onto itself
        assert set(mixed[i].unique().tolist()) <= {float(i), float(pasted[i])}
    again = cutmix(images, labels, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and again[2] == kept and 0 < kept < 1


def test_matching_is_the_l1_distance_of_the_conv_weight_gradients_per_class():
    method = IDC("toy", 2, model="ConvNetW32", class_batching="loop")
    method.num_classes = 3
    net = get_model("ConvNetW32", 1, 3, (12, 12))
    generator = torch.Generator().manual_seed(0)
    real, syn = torch.randn(3 * 4, 1, 12, 12, generator=generator), torch.randn(3 * 2, 1, 12, 12, generator=generator)
    convs = [p for p in net.parameters() if p.dim() == 4]
    assert 0 < len(convs) < len(list(net.parameters()))
    expected = 0.0
    for c in range(3):
        target = torch.full((4,), c)
        grads_real = torch.autograd.grad(F.cross_entropy(net(real[4 * c:4 * c + 4]), target), convs)
        grads_syn = torch.autograd.grad(F.cross_entropy(net(syn[2 * c:2 * c + 2]), target[:2]), convs)
        expected += sum(float((s - r).abs().sum()) for r, s in zip(grads_real, grads_syn))
    assert float(method.matching_loss(net, real, syn, 4, 2).detach()) == pytest.approx(expected, rel=1e-5)


def test_capped_keeps_the_same_random_positions_of_every_class():
    method = IDC("toy", 2, batch_syn_max=2)
    method.num_classes, method.generator = 3, torch.Generator().manual_seed(0)
    syn = torch.arange(3 * 5.0).view(15, 1, 1, 1)
    capped, per_class = method.capped(syn, 5)
    positions = capped.view(3, 2) - torch.tensor([[0.0], [5.0], [10.0]])
    assert per_class == 2 and torch.equal(positions[0], positions[1]) and torch.equal(positions[1], positions[2])
    assert method.capped(syn, 2)[1] == 2


def test_a_short_run_lowers_the_matching_loss_keeps_pixels_in_range_and_decodes_four_per_image():
    data = toy_dataset()
    start = ce.distill(data, iterations=0, **dict(RUN, **FAST))
    syn = ce.distill(data, iterations=4, **dict(RUN, **FAST))
    assert syn.factor == 2 and syn.materialize()[0].shape == (3 * 2 * 4, 1, 12, 12)
    pixels = syn.images * torch.tensor(data.std).view(1, -1, 1, 1) + torch.tensor(data.mean).view(1, -1, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    real = data.normalized()
    real = torch.cat([real[data.labels == c][:24] for c in range(3)])
    measure = IDC(data.name, 2, **FAST)
    measure.num_classes = 3
    before = after = 0.0
    for seed in range(3):
        torch.manual_seed(100 + seed)
        net = get_model("ConvNetW32", 1, 3, (12, 12))
        before += float(measure.matching_loss(net, real, start.materialize()[0], 24, 8).detach())
        after += float(measure.matching_loss(net, real, syn.materialize()[0], 24, 8).detach())
    assert after < 0.9 * before, (before, after)


def test_an_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="metric"):
        ce.distill(toy_dataset(), iterations=1, **dict(RUN, **dict(FAST, metric="ours")))
