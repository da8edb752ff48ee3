"""ConvNetBank: one batched pass equals k separate ConvNets, both ways, values and input gradients;
seeded construction is deterministic and follows PyTorch's default init per net."""
import math

import pytest
import torch

from condense_engine.models import ConvNet, ConvNetBank, layers

NORMS = ["instancenorm", "batchnorm", "layernorm", "groupnorm", "none"]
TINY = dict(width=8, depth=2, im_size=(8, 8))


def stacked_embed(nets, x):
    return torch.stack([net.embed(x) for net in nets])


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("norm", NORMS)
def test_from_nets_equals_separate_nets_values_and_input_gradients(norm, k):
    nets = [ConvNet(3, 10, norm=norm, **TINY) for _ in range(k)]
    bank = ConvNetBank.from_nets(nets)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    weights = torch.randn(k, 4, bank.feature_dim)

    features = bank.embed(x)
    (bank_grad,) = torch.autograd.grad((features * weights).sum(), x)
    expected = stacked_embed(nets, x)
    (nets_grad,) = torch.autograd.grad((expected * weights).sum(), x)

    assert features.shape == (k, 4, nets[0].feature_dim)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(bank_grad, nets_grad)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("norm", NORMS)
def test_net_i_equals_bank_slice(norm, k):
    bank = ConvNetBank(k, 3, norm=norm, generator=torch.Generator().manual_seed(k), **TINY)
    x = torch.randn(4, 3, 8, 8)
    features = bank.embed(x)
    for index in range(k):
        net = bank.net(index, num_classes=5)
        assert net.classifier.out_features == 5
        torch.testing.assert_close(net.embed(x), features[index])
    # and back: a bank rebuilt from the extracted nets is the same bank
    rebuilt = ConvNetBank.from_nets([bank.net(i) for i in range(k)])
    torch.testing.assert_close(rebuilt.embed(x), features)


@pytest.mark.parametrize("act,pool", [("sigmoid", "maxpool"), ("swish", "none"),
                                      ("leakyrelu", "avgpool")])
def test_bank_matches_nets_for_other_activations_and_pools(act, pool):
    nets = [ConvNet(3, 10, act=act, pool=pool, **TINY) for _ in range(2)]
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(ConvNetBank.from_nets(nets).embed(x), stacked_embed(nets, x))


def test_bank_on_one_channel_28px_input():
    nets = [ConvNet(1, 10, width=8, norm="layernorm", im_size=(28, 28)) for _ in range(2)]
    bank = ConvNetBank.from_nets(nets)
    x = torch.randn(2, 1, 28, 28)
    features = bank.embed(x)
    assert features.shape == (2, 2, 8 * 4 * 4)
    torch.testing.assert_close(features, stacked_embed(nets, x))


def test_frozen_bank_passes_gradients_to_the_input_only():
    bank = ConvNetBank(3, 3, generator=torch.Generator().manual_seed(0), **TINY)
    bank.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    bank.embed(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in bank.parameters())
    nets = [bank.net(i) for i in range(3)]
    x_ref = x.detach().clone().requires_grad_(True)
    stacked_embed(nets, x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_batchnorm_running_statistics_match_per_net():
    nets = [ConvNet(3, 10, norm="batchnorm", **TINY) for _ in range(2)]
    bank = ConvNetBank.from_nets(nets)
    x = torch.randn(4, 3, 8, 8)
    bank.embed(x)
    stacked_embed(nets, x)  # training mode: both update their running statistics
    for index, net in enumerate(nets):
        extracted = bank.net(index)
        for block, reference in zip(extracted.features, net.features):
            torch.testing.assert_close(block.norm.running_mean, reference.norm.running_mean)
            torch.testing.assert_close(block.norm.running_var, reference.norm.running_var)
    bank.eval()
    for net in nets:
        net.eval()
    torch.testing.assert_close(bank.embed(x), stacked_embed(nets, x))


def test_seeded_bank_is_deterministic_and_seeds_differ():
    def build(seed):
        return ConvNetBank(2, 3, norm="layernorm", generator=torch.Generator().manual_seed(seed),
                           **TINY)

    first, again, other = build(0).state_dict(), build(0).state_dict(), build(1).state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]), name
    assert not torch.equal(first["features.0.conv.weight"], other["features.0.conv.weight"])


def test_seeded_bank_leaves_global_rng_alone_and_unseeded_uses_it():
    state = torch.get_rng_state()
    ConvNetBank(2, 3, generator=torch.Generator().manual_seed(0), **TINY)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    first = ConvNetBank(2, 3, **TINY).state_dict()
    torch.manual_seed(5)
    again = ConvNetBank(2, 3, **TINY).state_dict()
    assert torch.equal(first["features.1.conv.weight"], again["features.1.conv.weight"])


def test_bank_init_follows_pytorch_default_per_net():
    k, width = 4, 16
    bank = ConvNetBank(k, 3, width=width, depth=2, im_size=(8, 8),
                       generator=torch.Generator().manual_seed(0))
    for depth, fan_in in ((0, 3 * 9), (1, width * 9)):
        conv = bank.features[depth].conv
        bound = 1 / math.sqrt(fan_in)
        assert conv.weight.shape[1] * 9 == fan_in
        for tensor in (conv.weight, conv.bias):
            assert tensor.abs().max() <= bound
        # uniform on ±bound: standard deviation bound/sqrt(3)
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    norm = bank.features[0].norm
    assert torch.equal(norm.weight, torch.ones(k * width))
    assert torch.equal(norm.bias, torch.zeros(k * width))
    nets = [bank.net(i) for i in range(k)]
    assert not torch.equal(nets[0].features[1].conv.weight, nets[1].features[1].conv.weight)


def test_bank_uses_grouped_layers():
    bank = ConvNetBank(3, 3, width=8, depth=3, norm="groupnorm", im_size=(8, 8))
    convs = [block.conv for block in bank.features]
    assert convs[0].groups == 1 and convs[0].out_channels == 24
    assert all(conv.groups == 3 and conv.weight.shape == (24, 8, 3, 3) for conv in convs[1:])
    assert bank.features[0].norm.num_groups == 12


def test_bank_argument_errors():
    with pytest.raises(ValueError, match="k must be"):
        ConvNetBank(0, 3)
    with pytest.raises(ValueError, match="one architecture"):
        ConvNetBank.from_nets([ConvNet(3, 10, **TINY), ConvNet(3, 10, norm="none", **TINY)])
    with pytest.raises(ValueError, match="non-empty"):
        ConvNetBank.from_nets([])
    with pytest.raises(IndexError):
        ConvNetBank(2, 3, **TINY).net(2)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
def test_to_device_equals_to(device, norm):
    """One flat copy per dtype leaves every parameter and buffer (BatchNorm's long counter too) as .to would."""
    def make():
        return ConvNetBank(2, channel=3, width=8, norm=norm, im_size=(8, 8), generator=torch.Generator().manual_seed(3))

    moved, expected = make().to_device(device), make().to(device)
    for (name, got), (_, want) in zip(moved.state_dict().items(), expected.state_dict().items()):
        assert got.device.type == device and got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4)).to(device)
    torch.testing.assert_close(moved.embed(x), expected.embed(x))


@pytest.mark.parametrize("norm", NORMS)
def test_cpu_batches_run_in_chunks_with_the_same_features(norm, monkeypatch):
    bank = ConvNetBank(2, 3, norm=norm, generator=torch.Generator().manual_seed(0), **TINY)
    x = torch.randn(7, 3, 8, 8)
    whole = bank.embed(x)  # 7 images of 2·8·8·8·4 bytes: far below the budget, one pass
    passes = []
    one_pass = bank._embed_batch
    monkeypatch.setattr(bank, "_embed_batch", lambda part: passes.append(len(part)) or one_pass(part))
    monkeypatch.setattr(layers, "CPU_ACTIVATION_BYTES", 3 * 2 * 8 * 8 * 8 * 4)
    chunked = bank.embed(x)
    if norm == "batchnorm":  # training-mode BatchNorm mixes the images: never split
        assert passes == [7]
        bank.eval()
        passes.clear()
        torch.testing.assert_close(bank.embed(x), torch.cat([one_pass(p) for p in x.split(3)], dim=1))
        assert passes == [3, 3, 1]
    else:
        assert passes == [3, 3, 1]
        torch.testing.assert_close(chunked, whole)


def test_forward_chunk_bounds_activations_per_device():
    assert layers.forward_chunk("cpu", layers.CPU_ACTIVATION_BYTES // 16, 1000) == 16
    assert layers.forward_chunk("cpu", layers.CPU_ACTIVATION_BYTES // 16, 10) == 10
    assert layers.forward_chunk("cpu", 10 * layers.CPU_ACTIVATION_BYTES, 1000) == 1
    tiny_dm_real_batch = 200 * 256
    first_activation = 128 * 64 * 64 * 4
    assert layers.forward_chunk("cuda", first_activation, tiny_dm_real_batch) == 2048
    assert layers.forward_chunk("cuda", 128 * 32 * 32 * 4, 10 * 256) == 10 * 256  # CIFAR-10: one pass
