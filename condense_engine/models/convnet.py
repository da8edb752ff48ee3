"""The ConvNet family used by almost every condensation method (methods.md §1.2)."""
from collections import OrderedDict

import torch
from torch import nn

from condense_engine.models.layers import (ACTIVATIONS, NORMS, POOLS, check_choice,
                                           check_positive_size, conv_out, make_activation,
                                           make_norm, make_pool)
from condense_engine.ops import embed as epilogue_op

# Blocks whose norm → act → pool ops.embed_epilogue covers (every activation is supported).
FUSED_NORMS = ("instancenorm", "groupnorm")
FUSED_POOLS = ("avgpool", "none")


def first_padding(channel: int) -> int:
    """Padding of the first conv: 3 for 1-channel input (28×28 becomes 32×32), else 1."""
    return 3 if channel == 1 else 1


def block_shapes(channel: int, width: int, depth: int, pool: str,
                 im_size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """The (C, H, W) shape after each block's conv, plus the final feature shape as last entry."""
    check_choice("pool", pool, POOLS)
    height, width_px = im_size
    shapes = []
    for d in range(depth):
        padding = first_padding(channel) if d == 0 else 1
        height, width_px = conv_out(height, 3, padding), conv_out(width_px, 3, padding)
        shapes.append((width, height, width_px))
        if pool != "none":
            height, width_px = height // 2, width_px // 2
        check_positive_size("ConvNet", (height, width_px), im_size)
    shapes.append((width, height, width_px))
    return shapes


def run_fused_blocks(blocks: nn.Sequential, x: torch.Tensor, act: str, pool: str,
                     backend: str | None) -> torch.Tensor:
    """`blocks` (conv → GroupNorm → act → pool) applied to x, each block's norm → act → pool as
    one ops.embed_epilogue call on the conv output."""
    for block in blocks:
        x = epilogue_op.embed_epilogue(block.conv(x), block.norm.weight, block.norm.bias,
                                       groups=block.norm.num_groups, eps=block.norm.eps, act=act,
                                       pool=pool, backend=backend)
    return x


def convnet_block(conv: nn.Conv2d, norm: nn.Module, act: str, pool: str) -> nn.Sequential:
    """One conv → norm → act → pool block, with named children so weights can be found by role."""
    return nn.Sequential(OrderedDict(conv=conv, norm=norm, act=make_activation(act),
                                     pool=make_pool(pool)))


class ConvNet(nn.Module):
    """D blocks of conv3×3 → norm → act → pool, then one Linear classifier.

    `config` holds the architecture (all constructor arguments except `num_classes`) so that a
    ConvNetBank or FunctionalConvNet of the same shape can be built from it. By default the
    blocks run their modules; `use_fused_epilogue` switches training that needs only first-order
    gradients to the fused norm → act → pool.
    """

    fused_epilogue = False  # see use_fused_epilogue (class defaults, so pickled nets load too)
    epilogue_backend = None

    def __init__(self, channel: int, num_classes: int, width: int = 128, depth: int = 3,
                 norm: str = "instancenorm", act: str = "relu", pool: str = "avgpool",
                 im_size: tuple[int, int] = (32, 32)):
        super().__init__()
        check_choice("norm", norm, NORMS)
        check_choice("activation", act, ACTIVATIONS)
        self.config = dict(channel=channel, width=width, depth=depth, norm=norm, act=act,
                           pool=pool, im_size=tuple(im_size))
        self.num_classes = num_classes
        shapes = block_shapes(channel, width, depth, pool, tuple(im_size))
        blocks = []
        in_channels = channel
        for d in range(depth):
            padding = first_padding(channel) if d == 0 else 1
            conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=padding)
            blocks.append(convnet_block(conv, make_norm(norm, width, shapes[d]), act, pool))
            in_channels = width
        self.features = nn.Sequential(*blocks)
        self.feature_shape = shapes[-1]
        self.feature_dim = width * shapes[-1][1] * shapes[-1][2]
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def use_fused_epilogue(self, backend: str | None = None) -> bool:
        """Run each block's norm → act → pool as one ops.embed_epilogue call (backend None:
        automatic), and return whether this net's blocks can (instance or group norm, average
        or no pooling; others keep their modules). Same outputs to float rounding, fewer passes
        over the largest activations; the fused backwards are not differentiable again, so
        gradient matching (DC, DSA, IDC) must keep the modules."""
        self.fused_epilogue = self.config["norm"] in FUSED_NORMS and self.config["pool"] in FUSED_POOLS
        self.epilogue_backend = backend
        return self.fused_epilogue

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features: the classifier's input, as used by distribution matching."""
        if self.fused_epilogue:
            return run_fused_blocks(self.features, x, self.config["act"], self.config["pool"],
                                    self.epilogue_backend).flatten(1)
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
