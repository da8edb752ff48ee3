"""Reference of ops.embed_epilogue: GroupNorm → activation → pool, as the torch modules do it.

Built from the same functionals that nn.GroupNorm, nn.ReLU/LeakyReLU/Sigmoid/SiLU and
nn.AvgPool2d call, so a ConvNet block's norm/act/pool and this function agree bit for bit.
Inputs are assumed valid (ops.embed_epilogue checks them).
"""
import torch
import torch.nn.functional as F

from condense_engine.models.layers import LEAKY_SLOPE

ACTIVATIONS = {
    "relu": F.relu,
    "leakyrelu": lambda z: F.leaky_relu(z, LEAKY_SLOPE),
    "sigmoid": torch.sigmoid,
    "swish": F.silu,
}


def embed_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, groups: int,
                   eps: float = 1e-5, act: str = "relu", pool: str = "avgpool") -> torch.Tensor:
    """act(GroupNorm(groups, C)(x) with affine weight/bias), then 2×2 stride-2 average pool
    (floor for odd sizes) or none, for x (n, C, H, W)."""
    activated = ACTIVATIONS[act](F.group_norm(x, groups, weight, bias, eps))
    if pool == "avgpool":
        return F.avg_pool2d(activated, kernel_size=2, stride=2)
    return activated
