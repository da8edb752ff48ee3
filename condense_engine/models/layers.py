"""Building blocks shared by every network: norm, activation and pooling factories.

The option names follow the DC repository (`instancenorm`, `leakyrelu`, `avgpool`, ...), so a model
name such as "ConvNetBN" maps onto them directly.
"""
import torch
from torch import nn

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu", "swish")
POOLS = ("avgpool", "maxpool", "none")

GROUPNORM_GROUPS = 4
LEAKY_SLOPE = 0.01

#: Largest activation a CPU forward allocates at once where it may split its batch. glibc hands
#: blocks above its 32 MiB mmap ceiling back to the OS when freed, so each larger activation is
#: fresh pages whose faults cost several times the norm/act/pool arithmetic: a 2660-image
#: 28×28 ConvNet forward ran 2.2× faster in chunks of 16 images (2 cores, same features).
CPU_ACTIVATION_BYTES = 8 << 20
#: The same bound on an accelerator, where big batches run best: it only keeps a pass over a
#: huge batch within memory (DM's real batch on TinyImageNet, 200 classes × 256 images, has a
#: 100 GiB first activation; it runs as 25 passes of 2048 images).
ACCELERATOR_ACTIVATION_BYTES = 4 << 30


#: Channels of the widest full-resolution activation assumed when a model's own is unknown
#: (the ConvNets' width), to size batches by memory.
ACTIVATION_CHANNELS = 128


def forward_chunk(device, bytes_per_image: int, total: int) -> int:
    """Images per forward call for a batch whose samples are independent: as many as keep the
    largest activation within the device's bound (CPU_ACTIVATION_BYTES on the CPU,
    ACCELERATOR_ACTIVATION_BYTES elsewhere), at least one."""
    budget = CPU_ACTIVATION_BYTES if torch.device(device).type == "cpu" else ACCELERATOR_ACTIVATION_BYTES
    return max(1, min(total, budget // max(1, bytes_per_image)))


def check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the option when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def make_norm(norm: str, channels: int, shape: tuple[int, int, int] | None = None,
              device=None, dtype=None) -> nn.Module:
    """The normalisation layer for `channels` feature maps.

    "instancenorm" is GroupNorm with one group per channel (affine), the published construction;
    "layernorm" normalises over (C, H, W) and needs the feature `shape`.
    """
    check_choice("norm", norm, NORMS)
    factory = {"device": device, "dtype": dtype}
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True, **factory)
    if norm == "groupnorm":
        return nn.GroupNorm(GROUPNORM_GROUPS, channels, affine=True, **factory)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels, **factory)
    if norm == "layernorm":
        if shape is None:
            raise ValueError("layernorm needs the feature shape (C, H, W)")
        return nn.LayerNorm(shape, elementwise_affine=True, **factory)
    return nn.Identity()


def make_activation(act: str) -> nn.Module:
    """The activation module; swish is x·sigmoid(x) (nn.SiLU)."""
    check_choice("activation", act, ACTIVATIONS)
    return {
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
        "leakyrelu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
        "swish": nn.SiLU,
    }[act]()


def make_pool(pool: str) -> nn.Module:
    """2×2 stride-2 average or max pooling, or the identity."""
    check_choice("pool", pool, POOLS)
    if pool == "avgpool":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if pool == "maxpool":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.Identity()


def conv_out(size: int, kernel: int, padding: int, stride: int = 1) -> int:
    """Spatial size after a convolution (or pooling) with the given geometry."""
    return (size + 2 * padding - kernel) // stride + 1


def check_positive_size(model: str, size: tuple[int, int], im_size) -> None:
    """Raise a ValueError when the image is too small for the network's downsampling."""
    if min(size) < 1:
        raise ValueError(f"{model}: image size {tuple(im_size)} is too small for this depth")
