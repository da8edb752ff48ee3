"""Models over one flat parameter vector, for unrolled training (SPEC §4, §7; DD).

Trajectory methods and DD treat the student's weights as a single tensor that is updated by SGD
steps and differentiated through (including Hessian-vector products), so the forward pass reads
every weight from slices of the flat vector, laid out in the module's `parameters()` order, so
`flatten(module)` and `forward` agree. `FunctionalNet` does this for any registry model without
buffers through `torch.func.functional_call`; `FunctionalConvNet` writes the ConvNet out in
torch.nn.functional (its batch norm uses the batch's statistics, which a module call would
record into running buffers). `functional_model` picks one by model name.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from condense_engine.models.convnet import ConvNet, first_padding
from condense_engine.models.layers import GROUPNORM_GROUPS, make_activation, make_pool
from condense_engine.models.registry import CONVNET_VARIANTS, convnet_config, get_model


class FunctionalNet:
    """A model as a pure function of (x, flat_params); `build()` makes the module (freshly
    initialised). Its forward runs the module on the flat vector's views, so the module must hold
    no buffers (`buffers_allowed` only for a subclass whose own forward never reads them)."""

    def __init__(self, build: Callable[[], nn.Module], name: str = "model", buffers_allowed: bool = False):
        self._build = build
        with torch.device("meta"):  # shapes only: no memory, no random draws
            self._template = build()
        if not buffers_allowed and any(True for _ in self._template.buffers()):
            raise ValueError(f"{name} keeps buffers (batch norm's running statistics), which a functional "
                             f"forward leaves untrained: use a model without batch norm")
        self.names = [key for key, _ in self._template.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in self._template.named_parameters()]
        self.numels = [p.numel() for _, p in self._template.named_parameters()]
        self.num_params = sum(self.numels)

    def init_params(self, seed: int, device=None, dtype=None) -> torch.Tensor:
        """A freshly initialised module's parameters (PyTorch default init), flattened.

        Deterministic in `seed` and leaves the global random state untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = self._build()
        return self.flatten(net).to(device=device, dtype=dtype)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """A module's parameters concatenated into one detached flat vector."""
        params = list(module.named_parameters())
        if [name for name, _ in params] != self.names or \
                [tuple(p.shape) for _, p in params] != self.shapes:
            raise ValueError(f"module does not have this {type(self).__name__}'s architecture")
        return torch.cat([p.detach().reshape(-1) for _, p in params])

    def unflatten(self, flat_params: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the flat vector shaped like the module's parameters, keyed by their names."""
        if flat_params.dim() != 1 or flat_params.numel() != self.num_params:
            raise ValueError(f"flat_params must be a vector of {self.num_params} values, "
                             f"got shape {tuple(flat_params.shape)}")
        pieces = torch.split(flat_params, self.numels)
        return {name: piece.view(shape)
                for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def to_module(self, flat_params: torch.Tensor) -> nn.Module:
        """A module holding a copy of the flat parameters (e.g. to evaluate an expert snapshot)."""
        net = self._build()
        net.load_state_dict(self.unflatten(flat_params.detach()), strict=False)
        return net.to(flat_params.device)

    def forward(self, x: torch.Tensor, flat_params: torch.Tensor) -> torch.Tensor:
        """Logits; differentiable w.r.t. x and flat_params, to any order."""
        return torch.func.functional_call(self._template, self.unflatten(flat_params), (x,))

    def __call__(self, x: torch.Tensor, flat_params: torch.Tensor) -> torch.Tensor:
        return self.forward(x, flat_params)


class FunctionalConvNet(FunctionalNet):
    """The ConvNet architecture as a pure function of (x, flat_params).

    Batch norm uses the batch's statistics (training mode), as the student does while it trains.
    """

    def __init__(self, channel: int, num_classes: int, width: int = 128, depth: int = 3,
                 norm: str = "instancenorm", act: str = "relu", pool: str = "avgpool",
                 im_size: tuple[int, int] = (32, 32)):
        self.config = dict(channel=channel, width=width, depth=depth, norm=norm, act=act,
                           pool=pool, im_size=tuple(im_size))
        self.num_classes = num_classes
        # Batch norm here always normalises by the batch: the running buffers are never read.
        super().__init__(lambda: ConvNet(num_classes=num_classes, **self.config), "ConvNet", buffers_allowed=True)
        self.feature_dim = self._template.feature_dim
        self._activation = make_activation(act)
        self._pool = make_pool(pool)

    def _norm(self, h: torch.Tensor, weight, bias) -> torch.Tensor:
        norm = self.config["norm"]
        if norm == "instancenorm":
            return F.group_norm(h, h.shape[1], weight, bias)
        if norm == "groupnorm":
            return F.group_norm(h, GROUPNORM_GROUPS, weight, bias)
        if norm == "batchnorm":
            return F.batch_norm(h, None, None, weight, bias, training=True)
        if norm == "layernorm":
            return F.layer_norm(h, h.shape[1:], weight, bias)
        return h

    def embed(self, x: torch.Tensor, flat_params: torch.Tensor) -> torch.Tensor:
        """Flattened features (the classifier's input) under the given parameters."""
        return self._features(x, self.unflatten(flat_params))

    def _features(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        h = x
        for d in range(self.config["depth"]):
            prefix = f"features.{d}."
            padding = first_padding(self.config["channel"]) if d == 0 else 1
            h = F.conv2d(h, params[prefix + "conv.weight"], params[prefix + "conv.bias"],
                         padding=padding)
            h = self._norm(h, params.get(prefix + "norm.weight"), params.get(prefix + "norm.bias"))
            h = self._pool(self._activation(h))
        return h.flatten(1)

    def forward(self, x: torch.Tensor, flat_params: torch.Tensor) -> torch.Tensor:
        """Logits; differentiable w.r.t. x and flat_params, to any order."""
        params = self.unflatten(flat_params)
        return F.linear(self._features(x, params), params["classifier.weight"],
                        params["classifier.bias"])


def functional_model(name: str, channel: int, num_classes: int, im_size: tuple[int, int]) -> FunctionalNet:
    """The registry model `name` as a FunctionalNet: a FunctionalConvNet for ConvNet* names, the
    module itself run functionally for the others (ValueError for those with batch norm)."""
    if name in CONVNET_VARIANTS:
        return FunctionalConvNet(channel, num_classes, im_size=im_size, **convnet_config(name))
    return FunctionalNet(lambda: get_model(name, channel, num_classes, tuple(im_size)), name)
