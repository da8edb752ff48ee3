"""ResNet-18 for small images (methods.md §1.3): 3×3 stride-1 stem, no max pool, BasicBlock
×[2, 2, 2, 2] at widths 64/128/256/512, instance norm by default.

The "_AP" variants replace every stride-2 conv (main path and shortcut) by a stride-1 conv
followed by 2×2 average pooling, and skip the final 4×4 pool, so the classifier sees 512·4·4
features at 32 px.
"""
import torch
import torch.nn.functional as F
from torch import nn

from condense_engine.models.layers import check_choice, check_positive_size, conv_out, make_norm

RESNET_NORMS = ("instancenorm", "batchnorm")
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
FINAL_POOL = 4


class BasicBlock(nn.Module):
    """conv3×3 → norm → ReLU → conv3×3 → norm, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, avg_pool: bool):
        super().__init__()
        conv_stride = 1 if avg_pool else stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.downsample = nn.AvgPool2d(2, 2) if avg_pool and stride != 1 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=conv_stride, bias=False),
                nn.AvgPool2d(2, 2) if avg_pool and stride != 1 else nn.Identity(),
                make_norm(norm, planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.downsample(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18; `norm` is "instancenorm" (default) or "batchnorm"; `avg_pool` gives _AP."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32),
                 norm: str = "instancenorm", avg_pool: bool = False):
        super().__init__()
        check_choice("norm", norm, RESNET_NORMS)
        self.avg_pool = avg_pool
        self.conv1 = nn.Conv2d(channel, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, 64)
        stages, in_planes = [], 64
        size = list(im_size)
        for planes, stride in STAGES:
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, norm, avg_pool),
                                        BasicBlock(planes, planes, 1, norm, avg_pool)))
            if stride != 1:
                size = [s // 2 if avg_pool else conv_out(s, 3, 1, stride) for s in size]
            in_planes = planes
        if not avg_pool:
            size = [s // FINAL_POOL for s in size]
        check_positive_size(type(self).__name__, size, im_size)
        self.layers = nn.Sequential(*stages)
        self.feature_dim = 512 * size[0] * size[1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        if not self.avg_pool:
            out = F.avg_pool2d(out, FINAL_POOL)
        return out.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ResNet18BN(ResNet18):
    """ResNet-18 with BatchNorm."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)):
        super().__init__(channel, num_classes, im_size, norm="batchnorm")


class ResNet18_AP(ResNet18):  # noqa: N801 (the DC repository's model name)
    """ResNet-18 with average-pool downsampling, instance norm."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)):
        super().__init__(channel, num_classes, im_size, avg_pool=True)


class ResNet18BN_AP(ResNet18):  # noqa: N801 (the DC repository's model name)
    """ResNet-18 with average-pool downsampling and BatchNorm."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)):
        super().__init__(channel, num_classes, im_size, norm="batchnorm", avg_pool=True)
