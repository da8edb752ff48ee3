"""k random ConvNets evaluated in one batched pass (grouped convolutions).

Channels are laid out net-major: channels [i·width, (i+1)·width) of every layer belong to net i.
The first conv is a plain conv with k·width outputs on the shared input; later convs are grouped
with groups=k, and the per-channel norms become one norm over k·width channels (instance norm:
GroupNorm(k·w, k·w); group norm: GroupNorm(4k, k·w); batch norm: BatchNorm2d(k·w)), which keeps
the nets independent. Layer norm normalises each net's (C, H, W) slice separately.

With instance or group norm and average pooling (or none), each block's norm → act → pool runs
as one `ops.embed_epilogue` call: the fused Triton kernel on CUDA, the native C++ one on the CPU
(the torch reference, which computes exactly what the modules do, where the extension is not
built).
"""
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from condense_engine.models.convnet import (FUSED_NORMS, FUSED_POOLS, ConvNet, block_shapes,
                                            convnet_block, first_padding, run_fused_blocks)
from condense_engine.models.layers import (ACTIVATIONS, GROUPNORM_GROUPS, NORMS, check_choice,
                                           forward_chunk, make_norm)
from condense_engine.ops.gather import host_to_device


class StackedLayerNorm(nn.Module):
    """k LayerNorms over (C, H, W), one per net, applied to net-major stacked channels.

    The affine parameters have shape (k·C, H, W) so that net i's slice is rows [i·C, (i+1)·C),
    the same layout as every other stacked tensor in the bank.
    """

    def __init__(self, k: int, shape: tuple[int, int, int], eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        channels, height, width = shape
        self.k, self.shape, self.eps = k, tuple(shape), eps
        self.weight = nn.Parameter(torch.ones(k * channels, height, width, device=device,
                                              dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(k * channels, height, width, device=device,
                                             dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_net = x.reshape(x.shape[0], self.k, *self.shape)
        normed = F.layer_norm(per_net, self.shape, eps=self.eps)
        weight = self.weight.view(self.k, *self.shape)
        bias = self.bias.view(self.k, *self.shape)
        return (normed * weight + bias).reshape(x.shape)


def stacked_norm(norm: str, k: int, shape: tuple[int, int, int], device=None,
                 dtype=None) -> nn.Module:
    """The norm layer acting on k nets' stacked channels as k separate per-net norms would."""
    channels = shape[0]
    factory = {"device": device, "dtype": dtype}
    if norm == "instancenorm":
        return nn.GroupNorm(k * channels, k * channels, affine=True, **factory)
    if norm == "groupnorm":
        return nn.GroupNorm(GROUPNORM_GROUPS * k, k * channels, affine=True, **factory)
    if norm == "layernorm":
        return StackedLayerNorm(k, shape, **factory)
    return make_norm(norm, k * channels, **factory)


def uniform_init_(tensor: torch.Tensor, bound: float, generator: torch.Generator | None) -> None:
    """Fill `tensor` from U(−bound, bound), drawing on the generator's device when they differ."""
    if generator is None or generator.device == tensor.device:
        tensor.uniform_(-bound, bound, generator=generator)
    else:
        draw = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
        tensor.copy_(draw.uniform_(-bound, bound, generator=generator))


def per_net(tensor: torch.Tensor, k: int, index: int) -> torch.Tensor:
    """Net `index`'s slice (a view) of a net-major stacked tensor."""
    return tensor.unflatten(0, (k, -1))[index]


class ConvNetBank(nn.Module):
    """k independently initialised ConvNet feature extractors evaluated at once.

    `embed(x)` maps (n, C, H, W) to (k, n, d) and equals stacking the k nets' `ConvNet.embed(x)`.
    Weights follow PyTorch's default init per net (U(±1/sqrt(fan_in)) for conv weights and biases,
    ones/zeros for norms), drawn from `generator` so a seeded generator gives the same bank.
    `epilogue_backend` forces the fused epilogue's backend (None: automatic; see embed).
    """

    def __init__(self, k: int, channel: int, width: int = 128, depth: int = 3,
                 norm: str = "instancenorm", act: str = "relu", pool: str = "avgpool",
                 im_size: tuple[int, int] = (32, 32), generator: torch.Generator | None = None,
                 device=None, dtype=None, epilogue_backend: str | None = None):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        check_choice("norm", norm, NORMS)
        check_choice("activation", act, ACTIVATIONS)
        self.k = k
        self.config = dict(channel=channel, width=width, depth=depth, norm=norm, act=act,
                           pool=pool, im_size=tuple(im_size))
        shapes = block_shapes(channel, width, depth, pool, tuple(im_size))
        self.fused_epilogue = norm in FUSED_NORMS and pool in FUSED_POOLS
        self.epilogue_backend = epilogue_backend
        device = torch.get_default_device() if device is None else device
        blocks = []
        for d in range(depth):
            conv = nn.utils.skip_init(
                nn.Conv2d, channel if d == 0 else k * width, k * width, kernel_size=3,
                padding=first_padding(channel) if d == 0 else 1, groups=1 if d == 0 else k,
                device=device, dtype=dtype)
            fan_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
            with torch.no_grad():
                uniform_init_(conv.weight, 1.0 / math.sqrt(fan_in), generator)
                uniform_init_(conv.bias, 1.0 / math.sqrt(fan_in), generator)
            norm_layer = stacked_norm(norm, k, shapes[d], device=device, dtype=dtype)
            blocks.append(convnet_block(conv, norm_layer, act, pool))
        self.features = nn.Sequential(*blocks)
        self.feature_shape = shapes[-1]
        self.feature_dim = width * shapes[-1][1] * shapes[-1][2]

    @classmethod
    def from_nets(cls, nets: Sequence[ConvNet]) -> "ConvNetBank":
        """A bank holding copies of the given ConvNets' feature weights (and norm statistics)."""
        if not nets or not all(isinstance(net, ConvNet) for net in nets):
            raise ValueError("from_nets needs a non-empty sequence of ConvNet")
        config = nets[0].config
        if any(net.config != config for net in nets):
            raise ValueError("from_nets needs nets of one architecture (same ConvNet config)")
        reference = next(nets[0].parameters())
        bank = cls(len(nets), device=reference.device, dtype=reference.dtype, **config)
        with torch.no_grad():
            for index, net in enumerate(nets):
                for stacked, single in bank._paired_tensors(index, net):
                    stacked.copy_(single)
        return bank

    def net(self, index: int, num_classes: int = 10) -> ConvNet:
        """A standalone ConvNet with net `index`'s weights and a freshly initialised classifier."""
        if not 0 <= index < self.k:
            raise IndexError(f"net index {index} out of range for a bank of {self.k}")
        reference = next(self.parameters())
        net = ConvNet(num_classes=num_classes, **self.config).to(reference.device,
                                                                  reference.dtype)
        with torch.no_grad():
            for stacked, single in self._paired_tensors(index, net):
                single.copy_(stacked)
        return net.train(self.training)

    def _paired_tensors(self, index: int,
                        net: ConvNet) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(bank slice, net tensor) for every weight and norm statistic of net `index`."""
        for bank_block, net_block in zip(self.features, net.features):
            for role in ("conv", "norm"):
                bank_layer, net_layer = getattr(bank_block, role), getattr(net_block, role)
                net_tensors = dict(net_layer.named_parameters())
                net_tensors.update(net_layer.named_buffers())
                bank_tensors = dict(bank_layer.named_parameters())
                bank_tensors.update(bank_layer.named_buffers())
                for name, stacked in bank_tensors.items():
                    if stacked.dim() > 0:  # skips BatchNorm's num_batches_tracked counter
                        yield per_net(stacked, self.k, index), net_tensors[name]

    def to_device(self, device) -> "ConvNetBank":
        """Move every parameter and buffer to `device` with one pinned, non-blocking copy per dtype.

        DM draws a fresh bank on the CPU generator every iteration; `.to(cuda)` would copy each
        tensor from pageable memory and make the host wait for the GPU each time.
        """
        by_dtype: dict = {}
        for tensor in (*self.parameters(), *self.buffers()):
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        with torch.no_grad():
            for tensors in by_dtype.values():
                flat = host_to_device(torch.cat([t.detach().reshape(-1) for t in tensors]), device)
                for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                    tensor.data = part.view_as(tensor)
        return self

    @property
    def images_independent(self) -> bool:
        """Whether an image's features depend on that image alone: true unless BatchNorm is in
        training mode, where batch statistics mix the batch."""
        return self.config["norm"] != "batchnorm" or not self.training

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features of every net for the batch x (n, C, H, W), shape (k, n, d).

        Blocks with instance/group norm and average or no pooling run conv, then the fused
        norm → act → pool epilogue; the others run their modules in order. A batch
        whose images are independent (any norm but BatchNorm in training mode) runs in chunks
        that keep each activation within a bound (see `forward_chunk`: small on the CPU, GiBs on
        a GPU); the features agree to float rounding.
        """
        chunk = len(x)
        if self.images_independent:
            per_image = self.k * self.config["width"] * x.shape[2] * x.shape[3] * x.element_size()
            chunk = forward_chunk(x.device, per_image, len(x))
        if chunk >= len(x):
            return self._embed_batch(x)
        return torch.cat([self._embed_batch(part) for part in x.split(chunk)], dim=1)

    def _embed_batch(self, x: torch.Tensor) -> torch.Tensor:
        """embed() of one batch in one pass."""
        if not self.fused_epilogue:
            features = self.features(x)
        else:
            features = run_fused_blocks(self.features, x, self.config["act"], self.config["pool"],
                                        self.epilogue_backend)
        return features.reshape(x.shape[0], self.k, self.feature_dim).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)
