"""Cross-architecture evaluation nets from the DC repository (methods.md §1.3): MLP, LeNet,
AlexNet(BN) and VGG-11(BN).

Each has `embed(x)` (the last Linear layer's input) and `forward(x)` (logits). Classifier input
sizes follow from `im_size`, so the nets work at 28, 32 and 64 px with 1 or 3 channels.
"""
import torch
from torch import nn

from condense_engine.models.layers import check_choice, check_positive_size, conv_out, make_norm

PLAIN_NORMS = ("instancenorm", "batchnorm", "none")


class MLP(nn.Module):
    """input → 128 → 128 → classes, ReLU."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)):
        super().__init__()
        self.feature_dim = 128
        self.fc_1 = nn.Linear(channel * im_size[0] * im_size[1], 128)
        self.fc_2 = nn.Linear(128, 128)
        self.classifier = nn.Linear(128, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc_2(torch.relu(self.fc_1(x.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class LeNet(nn.Module):
    """conv5×5(6) → ReLU → maxpool → conv5×5(16) → ReLU → maxpool → FC 120 → 84 → classes."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)):
        super().__init__()
        padding = 2 if channel == 1 else 0
        self.features = nn.Sequential(
            nn.Conv2d(channel, 6, kernel_size=5, padding=padding), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        size = [(conv_out(s, 5, padding) // 2 - 4) // 2 for s in im_size]
        check_positive_size("LeNet", size, im_size)
        self.fc_1 = nn.Linear(16 * size[0] * size[1], 120)
        self.fc_2 = nn.Linear(120, 84)
        self.feature_dim = 84
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        return torch.relu(self.fc_2(torch.relu(self.fc_1(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def conv_norm_relu(in_channels: int, out_channels: int, kernel: int, padding: int,
                   norm: str) -> list[nn.Module]:
    """conv → (norm) → ReLU, the unit AlexNet and VGG are made of."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=padding)]
    if norm != "none":
        layers.append(make_norm(norm, out_channels))
    return layers + [nn.ReLU()]


class AlexNet(nn.Module):
    """Small-image AlexNet: conv5×5 128 → pool → conv5×5 192 → pool → conv3×3 256/192/192 → pool
    → one Linear. `norm="batchnorm"` adds a BN after every conv (AlexNetBN)."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32),
                 norm: str = "none"):
        super().__init__()
        check_choice("norm", norm, PLAIN_NORMS)
        padding = 4 if channel == 1 else 2
        self.features = nn.Sequential(
            *conv_norm_relu(channel, 128, 5, padding, norm), nn.MaxPool2d(2, 2),
            *conv_norm_relu(128, 192, 5, 2, norm), nn.MaxPool2d(2, 2),
            *conv_norm_relu(192, 256, 3, 1, norm),
            *conv_norm_relu(256, 192, 3, 1, norm),
            *conv_norm_relu(192, 192, 3, 1, norm), nn.MaxPool2d(2, 2),
        )
        size = [conv_out(s, 5, padding) // 8 for s in im_size]
        check_positive_size("AlexNet", size, im_size)
        self.feature_dim = 192 * size[0] * size[1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class AlexNetBN(AlexNet):
    """AlexNet with BatchNorm after every conv."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)):
        super().__init__(channel, num_classes, im_size, norm="batchnorm")


VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 (64-M-128-M-256-256-M-512-512-M-512-512-M), conv3×3 → norm → ReLU, one Linear.

    The norm defaults to instance norm (GroupNorm(C, C)); the first conv pads 3 on 1-channel input.
    """

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32),
                 norm: str = "instancenorm"):
        super().__init__()
        check_choice("norm", norm, PLAIN_NORMS)
        layers, in_channels = [], channel
        size = list(im_size)
        for entry in VGG11_LAYOUT:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size = [s // 2 for s in size]
                continue
            padding = 3 if channel == 1 and not layers else 1
            layers += conv_norm_relu(in_channels, entry, 3, padding, norm)
            size = [conv_out(s, 3, padding) for s in size]
            in_channels = entry
        check_positive_size("VGG11", size, im_size)
        self.features = nn.Sequential(*layers)
        self.feature_dim = 512 * size[0] * size[1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class VGG11BN(VGG11):
    """VGG-11 with BatchNorm."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)):
        super().__init__(channel, num_classes, im_size, norm="batchnorm")
