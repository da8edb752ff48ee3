"""Model names of the DC repository's get_network, mapped onto this package's classes."""
from torch import nn

from condense_engine.models.classic import MLP, VGG11, VGG11BN, AlexNet, AlexNetBN, LeNet
from condense_engine.models.convnet import ConvNet
from condense_engine.models.resnet import ResNet18, ResNet18_AP, ResNet18BN, ResNet18BN_AP

CONVNET_DEFAULTS = dict(width=128, depth=3, norm="instancenorm", act="relu", pool="avgpool")

# Each ConvNet* name changes some of CONVNET_DEFAULTS.
CONVNET_VARIANTS = {
    "ConvNet": {},
    **{f"ConvNetD{depth}": dict(depth=depth) for depth in range(1, 6)},
    **{f"ConvNetW{width}": dict(width=width) for width in (32, 64, 128, 256)},
    "ConvNetIN": dict(norm="instancenorm"),
    "ConvNetBN": dict(norm="batchnorm"),
    "ConvNetLN": dict(norm="layernorm"),
    "ConvNetGN": dict(norm="groupnorm"),
    "ConvNetNN": dict(norm="none"),
    "ConvNetAS": dict(act="sigmoid"),
    "ConvNetAR": dict(act="relu"),
    "ConvNetAL": dict(act="leakyrelu"),
    "ConvNetASwish": dict(act="swish"),
    "ConvNetASwishBN": dict(act="swish", norm="batchnorm"),
    "ConvNetNP": dict(pool="none"),
    "ConvNetMP": dict(pool="maxpool"),
    "ConvNetAP": dict(pool="avgpool"),
}

OTHER_MODELS = {
    "MLP": MLP,
    "LeNet": LeNet,
    "AlexNet": AlexNet,
    "AlexNetBN": AlexNetBN,
    "VGG11": VGG11,
    "VGG11BN": VGG11BN,
    "ResNet18": ResNet18,
    "ResNet18BN": ResNet18BN,
    "ResNet18_AP": ResNet18_AP,
    "ResNet18BN_AP": ResNet18BN_AP,
}


def model_names() -> list[str]:
    """Every name get_model accepts."""
    return list(CONVNET_VARIANTS) + list(OTHER_MODELS)


def convnet_config(name: str) -> dict:
    """The ConvNet keyword arguments (width, depth, norm, act, pool) of a ConvNet* model name."""
    if name not in CONVNET_VARIANTS:
        raise ValueError(f"{name!r} is not a ConvNet model; ConvNet names: "
                         f"{', '.join(CONVNET_VARIANTS)}")
    return {**CONVNET_DEFAULTS, **CONVNET_VARIANTS[name]}


def get_model(name: str, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32),
              **convnet_overrides) -> nn.Module:
    """A freshly initialised model by DC-repository name.

    `convnet_overrides` (width, depth, norm, act, pool) adjust a ConvNet* architecture, e.g.
    depth=4 for 64 px images as in MTT; they are rejected for other models.
    """
    if name in CONVNET_VARIANTS:
        config = {**convnet_config(name), **convnet_overrides}
        return ConvNet(channel, num_classes, im_size=tuple(im_size), **config)
    if name in OTHER_MODELS:
        if convnet_overrides:
            raise ValueError(f"{name} takes no architecture options, got "
                             f"{', '.join(convnet_overrides)}")
        return OTHER_MODELS[name](channel, num_classes, im_size=tuple(im_size))
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
