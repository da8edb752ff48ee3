"""Networks: shapes for every registered name, the ConvNet's published geometry, the registry,
and the flat-parameter FunctionalConvNet against the module ConvNet."""
import pytest
import torch

from condense_engine import models
from condense_engine.models import (ConvNet, FunctionalConvNet, FunctionalNet, convnet_config, functional_model,
                                    get_model)

NORMS = ["instancenorm", "batchnorm", "layernorm", "groupnorm", "none"]
REQUIRED_NAMES = (
    ["ConvNet"] + [f"ConvNetD{d}" for d in range(1, 6)]
    + [f"ConvNetW{w}" for w in (32, 64, 128, 256)]
    + ["ConvNetBN", "ConvNetLN", "ConvNetGN", "ConvNetNN", "ConvNetAS", "ConvNetAR", "ConvNetAL",
       "ConvNetASwish", "ConvNetASwishBN", "ConvNetNP", "ConvNetMP", "ConvNetAP", "MLP", "LeNet",
       "AlexNet", "AlexNetBN", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN", "ResNet18_AP",
       "ResNet18BN_AP"]
)
INPUTS = [(1, (28, 28)), (3, (32, 32)), (3, (64, 64))]


@pytest.mark.parametrize("channel,im_size", INPUTS, ids=["28px1ch", "32px3ch", "64px3ch"])
@pytest.mark.parametrize("name", models.model_names())
def test_every_model_forward_and_embed_shapes(name, channel, im_size):
    model = get_model(name, channel, 7, im_size)
    x = torch.randn(2, channel, *im_size)
    with torch.no_grad():
        features = model.embed(x)
        logits = model(x)
    assert features.shape == (2, model.feature_dim)
    assert logits.shape == (2, 7)
    # embed is exactly the classifier's input
    torch.testing.assert_close(logits, model.classifier(features))


def test_model_names_cover_the_dc_repository_names():
    assert set(REQUIRED_NAMES) <= set(models.model_names())


@pytest.mark.parametrize("name,channel,im_size,expected", [
    ("ConvNet", 3, (32, 32), 2048),
    ("ConvNet", 1, (28, 28), 2048),
    ("ConvNet", 3, (64, 64), 8192),
    ("ConvNetD4", 3, (64, 64), 2048),
    ("ConvNetD5", 3, (128, 128), 2048),
    ("ConvNetW32", 3, (32, 32), 512),
    ("ConvNetNP", 3, (32, 32), 128 * 32 * 32),
    ("MLP", 3, (32, 32), 128),
    ("LeNet", 3, (32, 32), 84),
    ("AlexNet", 3, (32, 32), 3072),
    ("AlexNet", 1, (28, 28), 3072),
    ("VGG11", 3, (32, 32), 512),
    ("VGG11", 1, (28, 28), 512),
    ("ResNet18", 3, (32, 32), 512),
    ("ResNet18", 3, (64, 64), 2048),
    ("ResNet18_AP", 3, (32, 32), 8192),
])
def test_published_feature_sizes(name, channel, im_size, expected):
    assert get_model(name, channel, 10, im_size).feature_dim == expected


def test_convnet_pads_one_channel_28px_to_32px():
    net = ConvNet(1, 10, norm="layernorm", im_size=(28, 28))
    first = net.features[0]
    assert first.conv.padding == (3, 3)
    assert net.features[1].conv.padding == (1, 1)
    assert first.conv(torch.randn(2, 1, 28, 28)).shape == (2, 128, 32, 32)
    # the layer norm of the first block covers the padded 32×32 maps
    assert first.norm.normalized_shape == (128, 32, 32)


def test_convnet_norm_layers_follow_the_published_construction():
    instance = ConvNet(3, 10, width=16, depth=1).features[0].norm
    group = ConvNet(3, 10, width=16, depth=1, norm="groupnorm").features[0].norm
    assert isinstance(instance, torch.nn.GroupNorm) and instance.affine
    assert instance.num_groups == instance.num_channels == 16
    assert isinstance(group, torch.nn.GroupNorm) and group.num_groups == 4
    assert isinstance(ConvNet(3, 10, depth=1, norm="batchnorm").features[0].norm,
                      torch.nn.BatchNorm2d)
    assert len(list(ConvNet(3, 10, depth=1, norm="none").features[0].norm.parameters())) == 0


def test_convnet_swish_and_leaky_relu_activations():
    x = torch.randn(50)
    swish = ConvNet(3, 10, depth=1, act="swish").features[0].act
    leaky = ConvNet(3, 10, depth=1, act="leakyrelu").features[0].act
    torch.testing.assert_close(swish(x), x * torch.sigmoid(x))
    torch.testing.assert_close(leaky(x), torch.where(x > 0, x, 0.01 * x))


@pytest.mark.parametrize("option", [dict(norm="weird"), dict(act="tanh"), dict(pool="lp")])
def test_convnet_rejects_unknown_options(option):
    with pytest.raises(ValueError, match=next(iter(option.values()))):
        ConvNet(3, 10, **option)


def test_convnet_rejects_images_too_small_for_its_depth():
    with pytest.raises(ValueError, match="too small"):
        ConvNet(3, 10, depth=6, im_size=(32, 32))


def test_get_model_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as error:
        get_model("ConvNetXL", 3, 10)
    assert "ConvNetD3" in str(error.value) and "ResNet18BN_AP" in str(error.value)


def test_get_model_overrides_only_for_convnets():
    assert get_model("ConvNet", 3, 200, (64, 64), depth=4).feature_dim == 2048
    with pytest.raises(ValueError, match="depth"):
        get_model("VGG11", 3, 10, depth=4)


def test_convnet_config():
    assert convnet_config("ConvNetD4") == dict(width=128, depth=4, norm="instancenorm",
                                               act="relu", pool="avgpool")
    assert convnet_config("ConvNetASwishBN")["norm"] == "batchnorm"
    assert convnet_config("ConvNetASwishBN")["act"] == "swish"
    net = ConvNet(3, 10, **convnet_config("ConvNetMP"))
    assert isinstance(net.features[0].pool, torch.nn.MaxPool2d)
    with pytest.raises(ValueError, match="not a ConvNet"):
        convnet_config("ResNet18")


# FunctionalConvNet ----------------------------------------------------------------------------

TINY = dict(width=4, depth=2, im_size=(8, 8))


@pytest.mark.parametrize("channel", [1, 3])
@pytest.mark.parametrize("norm", NORMS)
def test_functional_forward_equals_convnet(norm, channel):
    fn = FunctionalConvNet(channel, 5, norm=norm, **TINY)
    net = ConvNet(channel, 5, norm=norm, **TINY)  # training mode: batchnorm uses batch statistics
    flat = fn.flatten(net)
    assert flat.shape == (fn.num_params,) == (sum(p.numel() for p in net.parameters()),)
    x = torch.randn(3, channel, 8, 8)
    torch.testing.assert_close(fn.forward(x, flat), net(x))
    torch.testing.assert_close(fn.embed(x, flat), net.embed(x))


def test_functional_unflatten_round_trip_and_to_module():
    fn = FunctionalConvNet(3, 5, norm="layernorm", **TINY)
    flat = fn.init_params(seed=3)
    named = fn.unflatten(flat)
    net = ConvNet(3, 5, norm="layernorm", **TINY)
    assert list(named) == [name for name, _ in net.named_parameters()]
    assert [v.shape for v in named.values()] == [p.shape for p in net.parameters()]
    rebuilt = fn.to_module(flat)
    torch.testing.assert_close(fn.flatten(rebuilt), flat)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(rebuilt(x), fn(x, flat))


def test_functional_init_params_deterministic_in_seed_and_default_init():
    fn = FunctionalConvNet(3, 5, **TINY)
    state = torch.get_rng_state()
    first, again, other = fn.init_params(0), fn.init_params(0), fn.init_params(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.manual_seed(0)
    torch.testing.assert_close(first, fn.flatten(ConvNet(3, 5, **TINY)))


def test_functional_rejects_wrong_shapes():
    fn = FunctionalConvNet(3, 5, **TINY)
    with pytest.raises(ValueError, match="flat_params"):
        fn(torch.randn(1, 3, 8, 8), torch.zeros(fn.num_params + 1))
    with pytest.raises(ValueError, match="architecture"):
        fn.flatten(ConvNet(3, 5, width=8, depth=2, im_size=(8, 8)))


@pytest.mark.parametrize("norm,act,pool", [
    ("instancenorm", "swish", "avgpool"),
    ("batchnorm", "sigmoid", "avgpool"),
    ("layernorm", "swish", "none"),
    ("groupnorm", "leakyrelu", "avgpool"),
])
def test_functional_gradcheck_params_and_input(norm, act, pool):
    fn = FunctionalConvNet(2, 3, width=4, depth=2, norm=norm, act=act, pool=pool, im_size=(6, 6))
    flat = fn.init_params(0, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn.forward, (x, flat))


def test_functional_double_backward_gives_hessian_vector_products():
    fn = FunctionalConvNet(2, 3, width=4, depth=2, act="swish", im_size=(6, 6))
    flat = fn.init_params(0, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2])

    def loss_grad(params):
        loss = torch.nn.functional.cross_entropy(fn(x, params), labels)
        return torch.autograd.grad(loss, params, create_graph=True)[0]

    vector = torch.randn(fn.num_params, dtype=torch.float64)
    grad = loss_grad(flat)
    hvp, image_grad = torch.autograd.grad(grad @ vector, (flat, x))
    # the Hessian-vector product matches a central difference of gradients
    step = 1e-6
    finite = (loss_grad(flat + step * vector) - loss_grad(flat - step * vector)) / (2 * step)
    torch.testing.assert_close(hvp, finite.detach(), rtol=1e-5, atol=1e-7)
    assert image_grad.abs().sum() > 0
    assert torch.autograd.gradgradcheck(fn.forward, (x, flat))


# FunctionalNet: any registry model without buffers, run on a flat vector ----------------------

@pytest.mark.parametrize("name", ["LeNet", "MLP", "AlexNet"])
def test_a_registry_model_runs_functionally_as_its_module(name):
    fn = functional_model(name, 1, 4, (12, 12))
    assert type(fn) is FunctionalNet
    flat = fn.init_params(seed=2)
    torch.manual_seed(2)
    net = get_model(name, 1, 4, (12, 12))
    torch.testing.assert_close(flat, fn.flatten(net))
    assert flat.shape == (fn.num_params,) == (sum(p.numel() for p in net.parameters()),)
    x = torch.randn(3, 1, 12, 12)
    torch.testing.assert_close(fn(x, flat), net(x))
    torch.testing.assert_close(fn.to_module(flat)(x), net(x))


def test_a_functional_lenet_gives_exact_hessian_vector_products():
    """DD differentiates through LeNet's SGD steps: its double backward (max-pooling, ReLU) must
    match a central difference of gradients."""
    fn = functional_model("LeNet", 1, 3, (12, 12))
    flat = fn.init_params(0, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(4, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0])

    def loss_grad(params):
        loss = torch.nn.functional.cross_entropy(fn(x, params), labels)
        return torch.autograd.grad(loss, params, create_graph=True)[0]

    vector = torch.randn(fn.num_params, dtype=torch.float64)
    hvp, image_grad = torch.autograd.grad(loss_grad(flat) @ vector, (flat, x))
    step = 1e-6
    finite = (loss_grad(flat + step * vector) - loss_grad(flat - step * vector)) / (2 * step)
    torch.testing.assert_close(hvp, finite.detach(), rtol=1e-5, atol=1e-7)
    assert image_grad.abs().sum() > 0


def test_functional_model_writes_out_convnets_and_refuses_batch_norm_buffers():
    fn = functional_model("ConvNetW32", 3, 4, (8, 8))
    assert type(fn) is FunctionalConvNet and fn.config["width"] == 32
    for name in ("AlexNetBN", "VGG11BN", "ResNet18BN"):
        with pytest.raises(ValueError, match="batch norm"):
            functional_model(name, 3, 4, (32, 32))
    with pytest.raises(ValueError, match="unknown model"):
        functional_model("LeNet5", 3, 4, (32, 32))
    with pytest.raises(ValueError, match="architecture"):
        functional_model("LeNet", 1, 4, (12, 12)).flatten(get_model("LeNet", 1, 5, (12, 12)))
