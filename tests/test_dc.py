"""DC and DSA end to end on small data: registration, the published loop table, the batched
per-class gradients against the published per-class loop, the matching loss falls, published
BatchNorm handling, and bit-identical resume."""

import pytest
import torch
import torch.nn.functional as F

import condense_engine as ce
from condense_engine import ops
from condense_engine.methods import get_method
from condense_engine.methods.dc import DC, DSA, default_class_chunk
from condense_engine.models import ConvNet, get_model
from condense_engine.reference import match_dist as reference
from tests.toy_data import distill_interrupted, toy_dataset

# Two image updates per network with one network epoch in between: every part of the loop runs.
LOOPS = dict(outer_loop=2, inner_loop=1, batch_real=8, model="ConvNetW32")


def test_registered_as_dc_and_dsa():
    assert get_method("dc") is DC and get_method("dsa") is DSA
    assert DC("cifar10", 10).options["dsa"] is False
    assert DSA("cifar10", 10).options["dsa"] is True


@pytest.mark.parametrize("ipc,loops", [(1, (1, 1)), (10, (10, 50)), (20, (20, 25)), (30, (30, 20)),
                                       (40, (40, 15)), (50, (50, 10))])
def test_published_defaults(ipc, loops):
    options = DSA("cifar10", ipc).options
    assert (options["outer_loop"], options["inner_loop"]) == loops
    assert (options["lr_img"], options["momentum"], options["lr_net"]) == (0.1, 0.5, 0.01)
    assert (options["batch_real"], options["batch_train"], options["iterations"]) == (256, 256, 1000)


def test_ipc_outside_the_table_needs_explicit_loops():
    with pytest.raises(ValueError, match="outer_loop"):
        ce.distill(toy_dataset(), method="dc", ipc=2, iterations=1, progress=False, device="cpu")


def _published_loop_loss(net, real, syn, batch_real, per_class):
    """The published matching loss: one class at a time, torch.autograd.grad, per-layer distance."""
    params = list(net.parameters())
    loss = 0.0
    for c in range(real.shape[0] // batch_real):
        real_c, syn_c = real[c * batch_real:(c + 1) * batch_real], syn[c * per_class:(c + 1) * per_class]
        grads_real = torch.autograd.grad(F.cross_entropy(net(real_c), torch.full((batch_real,), c)), params)
        grads_syn = torch.autograd.grad(F.cross_entropy(net(syn_c), torch.full((per_class,), c)), params,
                                        create_graph=True)
        loss = loss + reference.match_dist([g.detach() for g in grads_real], list(grads_syn))
    return loss


def _batchnorm_net_in_matching_mode():
    net = ConvNet(1, 3, width=8, norm="batchnorm", im_size=(12, 12))
    net.train()
    with torch.no_grad():
        net(torch.randn(12, 1, 12, 12))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    return net


@pytest.mark.parametrize("make_net", [lambda: get_model("ConvNetW32", 1, 3, (12, 12)),
                                      _batchnorm_net_in_matching_mode], ids=["instancenorm", "batchnorm"])
@pytest.mark.parametrize("batching", [dict(class_batching="vmap"), dict(class_batching="vmap", class_chunk=2),
                                      dict(class_batching="loop")], ids=["vmap", "vmap-chunked", "loop"])
def test_batched_class_gradients_equal_the_per_class_loop(make_net, batching):
    method = DC("toy", 2, outer_loop=1, inner_loop=1, **batching)
    net = make_net()
    real = torch.randn(3 * 5, 1, 12, 12)
    syn = torch.randn(3 * 2, 1, 12, 12, requires_grad=True)
    grads = method.class_gradients(net, real, 5, create_graph=False)
    params = list(net.parameters())
    for c in range(3):
        looped = torch.autograd.grad(F.cross_entropy(net(real[5 * c:5 * c + 5]), torch.full((5,), c)), params)
        for batched, expected in zip(grads, looped):
            torch.testing.assert_close(batched[c], expected, rtol=1e-4, atol=1e-6)
    batched_loss = method.matching_loss(net, real, syn, 5, 2)
    looped_loss = _published_loop_loss(net, real, syn, 5, 2)
    torch.testing.assert_close(batched_loss, looped_loss, rtol=1e-5, atol=1e-5)
    batched_grad, = torch.autograd.grad(batched_loss, syn)
    looped_grad, = torch.autograd.grad(looped_loss, syn)
    torch.testing.assert_close(batched_grad, looped_grad, rtol=1e-4, atol=1e-6)


def test_matching_loss_with_triton_distance_equals_reference():
    method = DC("toy", 2, outer_loop=1, inner_loop=1, class_batching="vmap")
    net = get_model("ConvNetW32", 1, 3, (12, 12))
    real = torch.randn(3 * 4, 1, 12, 12)
    syn = torch.randn(3 * 2, 1, 12, 12, requires_grad=True)
    grads_real = method.class_gradients(net, real, 4, create_graph=False)
    grads_syn = method.class_gradients(net, syn, 2, create_graph=True)
    results = [ops.match_dist(grads_real, grads_syn, batched=True, backend=backend) for backend in ("torch", "triton")]
    image_grads = [torch.autograd.grad(loss, syn, retain_graph=True)[0] for loss in results]
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image_grads[1], image_grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_distillation_lowers_the_matching_loss(method, tmp_path):
    """From DC's published noise init and lr, a few iterations shrink the loss on unseen nets."""
    data = toy_dataset()
    options = dict(LOOPS, init="noise")
    log = tmp_path / "log.jsonl"
    start = ce.distill(data, method=method, ipc=2, iterations=0, seed=0, progress=False, device="cpu", **options)
    syn = ce.distill(data, method=method, ipc=2, iterations=6, seed=0, progress=False, device="cpu", log=str(log), **options)
    assert syn.images.shape == (6, 1, 12, 12) and syn.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(log.read_text().splitlines()) == 6
    real = data.normalized()
    real = torch.cat([real[data.labels == c][:24] for c in range(3)])
    measure = DC(data.name, 2, **options)
    before = after = 0.0
    for seed in range(3):
        torch.manual_seed(100 + seed)
        net = get_model("ConvNetW32", 1, 3, (12, 12))
        before += float(measure.matching_loss(net, real, start.images, 24, 2).detach())
        after += float(measure.matching_loss(net, real, syn.images, 24, 2).detach())
    assert after < 0.8 * before, (before, after)


def test_batchnorm_statistics_are_set_and_frozen_as_published():
    data = toy_dataset()
    options = dict(outer_loop=2, inner_loop=1, batch_real=4)
    syn = ce.distill(data, method="dc", ipc=1, iterations=0, seed=0, progress=False, device="cpu", **options)
    method = DC(data.name, 1, **options)
    method.init(syn, data, ce.datasets.ClassSampler(data), torch.Generator().manual_seed(0), torch.device("cpu"))
    net = ConvNet(1, 3, width=8, norm="batchnorm", im_size=(12, 12))
    method.freeze_batchnorm(net)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms) and net.training
    assert all(int(m.num_batches_tracked) == 1 and m.running_mean.abs().sum() > 0 for m in norms)
    bn_run = ce.distill(data, method="dc", ipc=1, iterations=1, seed=0, progress=False, device="cpu", model="ConvNetBN", **options)
    assert torch.isfinite(bn_run.images).all() and not torch.equal(bn_run.images, syn.images.detach())


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_resume_after_interruption_is_bit_identical(method, tmp_path):
    data = toy_dataset()
    full = ce.distill(data, method=method, ipc=2, iterations=4, seed=1, progress=False, device="cpu", **LOOPS)
    ckpt = str(tmp_path / "ckpt.pt")
    assert distill_interrupted(DC, 2, dataset=data, method=method, ipc=2, iterations=4, seed=1, progress=False, device="cpu",
                               checkpoint=ckpt, checkpoint_every=100, **LOOPS) == 2
    resumed = ce.distill(data, method=method, ipc=2, iterations=4, seed=1, progress=False, device="cpu", checkpoint=ckpt,
                         resume=True, **LOOPS)
    assert torch.equal(resumed.images, full.images)
    other = ce.distill(data, method=method, ipc=2, iterations=4, seed=2, progress=False, device="cpu", **LOOPS)
    assert not torch.equal(other.images, full.images)




def test_default_class_chunk_bounds_each_vmapped_pass_by_memory():
    assert default_class_chunk("cuda", 10, (3, 32, 32), 10) == 10      # CIFAR-10 IPC 10 synthetic set
    assert default_class_chunk("cuda", 256, (3, 32, 32), 10) == 8      # its real batches of 256
    assert default_class_chunk("cuda", 256, (3, 64, 64), 200) == 2     # TinyImageNet's
    assert default_class_chunk("cpu", 256, (3, 64, 64), 200) == 1
