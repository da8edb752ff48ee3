"""ops.embed_epilogue: a ConvNet block's GroupNorm → activation → 2×2 average pool, fused.

Backends: "torch" (the modules' functional composition, bit-identical to a ConvNet block),
"triton" (one kernel reading the conv output twice and writing only the pooled result; the
backward recomputes the normalised values from the saved mean and rstd) and "native" (the same
scheme in C++ for the CPU, csrc/ops/cpu/embed_epilogue.cpp). Automatic choice: triton on CUDA
tensors, native on the CPU where the extension is built, else torch.
"""
import functools
import math

import torch

from condense_engine.models.layers import LEAKY_SLOPE
from condense_engine.ops._backend import choose
from condense_engine.reference import embed as reference

POOLS = ("avgpool", "none")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def embed_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, groups: int,
                   eps: float = 1e-5, act: str = "relu", pool: str = "avgpool",
                   backend: str | None = None) -> torch.Tensor:
    """act(GroupNorm(groups, C)(x)·weight + bias), then 2×2 stride-2 average pooling.

    x: (n, C, H, W) fp32/bf16/fp16; weight, bias: (C,) floating point (their dtype may differ
    from x's; the result has x's dtype). groups must divide C: groups == C is instance norm, as
    in the ConvNets of condensation methods. act: "relu", "leakyrelu" (slope 0.01), "sigmoid"
    or "swish". pool: "avgpool" (odd H or W drop the last row or column, like AvgPool2d) or
    "none". Differentiable w.r.t. x, weight and bias on every backend.
    """
    _check_inputs(x, weight, bias, groups, eps, act, pool)
    chosen = choose("embed_epilogue", backend, x.device, ("torch", "triton", "native"))
    if chosen == "torch":
        return reference.embed_epilogue(x, weight, bias, groups=groups, eps=eps, act=act,
                                        pool=pool)
    if chosen == "native":
        register_native_autograd()
        out, _, _ = torch.ops.condense.embed_epilogue(x, weight, bias, groups, float(eps), act,
                                                      LEAKY_SLOPE, pool == "avgpool")
        return out
    from condense_engine.kernels import embed as fused

    return fused.embed_epilogue(x, weight, bias, groups=groups, eps=eps, act=act,
                                slope=LEAKY_SLOPE, pool=pool == "avgpool")


def _check_inputs(x, weight, bias, groups, eps, act, pool) -> None:
    """ValueErrors naming the argument that has a bad type, shape, dtype, device or value."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be an (n, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.shape != (channels,):
            raise ValueError(f"{name} must be a ({channels},) tensor (one value per channel of "
                             f"x), got {tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 \
            or channels % groups:
        raise ValueError(f"groups must be a positive integer dividing C={channels}, "
                         f"got {groups!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number ≥ 0, got {eps!r}")
    if act not in reference.ACTIVATIONS:
        raise ValueError(f"act must be one of {tuple(reference.ACTIVATIONS)}, got {act!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool == "avgpool" and min(x.shape[2:]) < 2:
        raise ValueError(f"pool='avgpool' needs H, W ≥ 2, got x of shape {tuple(x.shape)}")


@functools.cache
def register_native_autograd() -> None:
    """Make torch.ops.condense.embed_epilogue differentiable w.r.t. x, weight and bias, once:
    like the Triton kernel's, its backward has no derivative of its own, and differentiating it
    raises instead of silently giving zero. Also gives both ops the shape functions
    torch.compile needs."""
    def save_inputs(ctx, inputs, output):
        x, weight, bias, groups, _, act, slope, pool = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.settings = (groups, act, slope, pool)

    def epilogue_grad(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grads = torch.ops.condense.embed_epilogue_backward(grad_out, x, weight, bias, mean, rstd,
                                                          *ctx.settings)
        return grads + (None,) * 5

    @torch.library.register_fake("condense::embed_epilogue")
    def _(x, weight, bias, groups, eps, act, slope, pool):
        n, channels, height, width = x.shape
        out_size = (height // 2, width // 2) if pool else (height, width)
        stats = x.new_empty(n * groups, dtype=torch.promote_types(x.dtype, torch.float32))
        return x.new_empty((n, channels) + out_size), stats, stats.clone()

    @torch.library.register_fake("condense::embed_epilogue_backward")
    def _(grad_out, x, weight, bias, mean, rstd, groups, act, slope, pool):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)

    def refuse_second_derivative(ctx, *grads):
        raise RuntimeError("ops.embed_epilogue's native backward is not differentiable: for "
                           "higher-order gradients (e.g. gradient matching) use backend='torch'")

    torch.library.register_autograd("condense::embed_epilogue", epilogue_grad,
                                    setup_context=save_inputs)
    torch.library.register_autograd("condense::embed_epilogue_backward", refuse_second_derivative,
                                    setup_context=lambda ctx, inputs, output: None)
