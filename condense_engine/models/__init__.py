"""Networks for condensation and evaluation: the ConvNet family, a batched bank of k random
ConvNets, flat-parameter functional models for unrolled training, and the DC repository's
cross-architecture nets, all reachable by name through `get_model`."""
from condense_engine.models.bank import ConvNetBank
from condense_engine.models.classic import MLP, VGG11, VGG11BN, AlexNet, AlexNetBN, LeNet
from condense_engine.models.convnet import ConvNet
from condense_engine.models.functional import FunctionalConvNet, FunctionalNet, functional_model
from condense_engine.models.registry import convnet_config, get_model, model_names
from condense_engine.models.resnet import ResNet18, ResNet18_AP, ResNet18BN, ResNet18BN_AP

__all__ = [
    "AlexNet", "AlexNetBN", "ConvNet", "ConvNetBank", "FunctionalConvNet", "FunctionalNet", "LeNet", "MLP",
    "ResNet18", "ResNet18BN", "ResNet18BN_AP", "ResNet18_AP", "VGG11", "VGG11BN",
    "convnet_config", "functional_model", "get_model", "model_names",
]
