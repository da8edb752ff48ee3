"""Triton kernels of ops.moments: the mean and centred moments of every class in one launch per
pass, with the rows of a class split across programs when classes alone would leave the GPU idle.

A program owns one class, BLOCK_D features and one range of the class's rows, and walks that
range in BLOCK_N chunks. Pass 1 sums the rows; torch adds the ranges' partial sums into the mean.
Pass 2 sums the powers 2 … ORDER of the centred rows into an (ORDER_ROWS, BLOCK_D) fp32 register
tile, and torch adds the ranges again. Two passes over x rather than raw power sums, whose
conversion to centred moments cancels catastrophically; partial sums added by torch rather than
atomics, so the result is deterministic. Nothing of size N × d besides x and its gradient is
read or written.

Backward, with g_k the upstream gradient of moment k, c_k its value (c_1 = 0) and N rows:
    ∂m_1/∂a_i = 1/N,   ∂m_k/∂a_i = k/N · ((a_i − μ)^(k−1) − c_(k−1))   (k ≥ 2)
so dL/da_i = b + Σ_{k≥2} (k/N)·g_k·(a_i − μ)^(k−1), with the per-feature constant
b = (g_1 − Σ_{k≥2} k·g_k·c_(k−1)) / N: one pass over the rows, in the same programs, each
element written by exactly one of them.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_chunk(x_ptr, cls, first, rows_end, rows_count, dim, features, BLOCK_N: tl.constexpr):
    """Rows first … first + BLOCK_N (up to rows_end) of class `cls` at `features`, in fp32 (0
    outside), with their offsets and mask."""
    rows = first + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < rows_end) & (features[None, :] < dim)
    offsets = (cls * rows_count + rows[:, None]) * dim + features[None, :]
    return tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32), offsets, inside


@triton.jit
def _power_sums_kernel(x_ptr, mean_ptr, partial_ptr, rows_count, dim, rows_per_split,
                       CENTRED: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                       POWER_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """partial[cls, split, k − FIRST, :] = Σ over the split's rows of (a − μ)^k, k = FIRST … LAST
    (μ = 0 unless CENTRED)."""
    cls, split = tl.program_id(0), tl.program_id(2)
    splits = tl.num_programs(2)
    features = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mean = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if CENTRED:
        mean = tl.load(mean_ptr + cls * dim + features, mask=features < dim, other=0.0)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, rows_count)
    which = tl.arange(0, POWER_ROWS)[:, None]
    sums = tl.zeros((POWER_ROWS, BLOCK_D), dtype=tl.float32)
    for first in range(start, end, BLOCK_N):
        chunk, offsets, inside = _rows_chunk(x_ptr, cls, first, end, rows_count, dim, features, BLOCK_N)
        centred = tl.where(inside, chunk - mean[None, :], 0.0)
        power = centred
        for k in tl.static_range(FIRST, LAST + 1):  # row k − FIRST holds Σ (a − μ)^k
            if k > 1:
                power = power * centred
            sums += tl.where(which == k - FIRST, tl.sum(power, axis=0)[None, :], 0.0)
    offsets = ((cls * splits + split) * (LAST - FIRST + 1) + which) * dim + features[None, :]
    tl.store(partial_ptr + offsets, sums, mask=(which <= LAST - FIRST) & (features[None, :] < dim))


@triton.jit
def _moments_backward_kernel(x_ptr, out_ptr, upstream_ptr, grad_ptr, rows_count, dim, rows_per_split,
                             ORDER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cls, split = tl.program_id(0), tl.program_id(2)
    features = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid = features < dim
    base = cls * ORDER * dim + features
    mean = tl.load(out_ptr + base, mask=valid, other=0.0)
    constant = tl.load(upstream_ptr + base, mask=valid, other=0.0)
    for k in tl.static_range(3, ORDER + 1):  # − k·g_k·c_(k−1); c_1 = 0 drops k = 2
        previous = tl.load(out_ptr + base + (k - 2) * dim, mask=valid, other=0.0)
        constant -= k * tl.load(upstream_ptr + base + (k - 1) * dim, mask=valid, other=0.0) * previous
    constant = constant / rows_count
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, rows_count)
    for first in range(start, end, BLOCK_N):
        chunk, offsets, inside = _rows_chunk(x_ptr, cls, first, end, rows_count, dim, features, BLOCK_N)
        centred = chunk - mean[None, :]
        grad = tl.zeros_like(centred) + constant[None, :]
        power = tl.zeros_like(centred) + 1.0
        for k in tl.static_range(2, ORDER + 1):  # + (k/N)·g_k·(a − μ)^(k−1)
            power = power * centred
            weight = tl.load(upstream_ptr + base + (k - 1) * dim, mask=valid, other=0.0) * (k / rows_count)
            grad += weight[None, :] * power
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=inside)


@dataclass(frozen=True)
class LaunchShape:
    """Rows per chunk, features per program, warps, and row ranges (splits) per class."""
    block_n: int
    block_d: int
    num_warps: int
    splits: int

    def rows_per_split(self, rows_count: int) -> int:
        """Rows of each range: whole chunks, so only the last range ends inside one."""
        return triton.cdiv(triton.cdiv(rows_count, self.splits), self.block_n) * self.block_n

    def grid(self, classes: int, rows_count: int, dim: int) -> tuple[int, int, int]:
        return classes, triton.cdiv(dim, self.block_d), triton.cdiv(rows_count, self.rows_per_split(rows_count))


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_shape(device: torch.device, classes: int, rows_count: int, dim: int) -> LaunchShape:
    """The launch for x (classes, rows_count, dim) on `device`. On a GPU the rows of a class are
    split until there are about four programs per multiprocessor (a tall x of one class would
    otherwise run on one); the CPU interpreter prefers few, large programs."""
    if device.type != "cuda":
        return LaunchShape(64, 64, 1, 1)
    block_n, block_d = 32, 128
    programs = classes * triton.cdiv(dim, block_d)
    wanted = triton.cdiv(4 * _multiprocessors(device), programs)
    return LaunchShape(block_n, block_d, 4, max(1, min(wanted, triton.cdiv(rows_count, block_n))))


def _power_sums(x: torch.Tensor, mean: torch.Tensor | None, first: int, last: int, shape: LaunchShape) -> torch.Tensor:
    """(C, last − first + 1, d) fp32: Σ over each class's rows of (a − μ)^k, k = first … last."""
    classes, rows_count, dim = x.shape
    grid = shape.grid(classes, rows_count, dim)
    partial = torch.empty((classes, grid[2], last - first + 1, dim), dtype=torch.float32, device=x.device)
    _power_sums_kernel[grid](x, x if mean is None else mean, partial, rows_count, dim,  # x: unread when not CENTRED
                             shape.rows_per_split(rows_count), CENTRED=mean is not None, FIRST=first, LAST=last,
                             POWER_ROWS=triton.next_power_of_2(last - first + 1), BLOCK_N=shape.block_n,
                             BLOCK_D=shape.block_d, num_warps=shape.num_warps)
    return partial.sum(1)


class Moments(torch.autograd.Function):
    """(C, order, d) fp32 moments of x (C, N, d): two launches forward (sums, then centred power
    sums), one backward."""

    @staticmethod
    def forward(ctx, x, order: int):
        x = x.contiguous()
        classes, rows_count, dim = x.shape
        shape = launch_shape(x.device, classes, rows_count, dim)
        mean = _power_sums(x, None, 1, 1, shape) / rows_count
        if order > 1:
            out = torch.cat([mean, _power_sums(x, mean, 2, order, shape) / rows_count], dim=1)
        else:
            out = mean
        ctx.save_for_backward(x, out)
        ctx.order, ctx.launch = order, shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream):
        x, out = ctx.saved_tensors
        classes, rows_count, dim = x.shape
        shape = ctx.launch
        grad = torch.empty_like(x)
        _moments_backward_kernel[shape.grid(classes, rows_count, dim)](
            x, out, upstream.float().contiguous(), grad, rows_count, dim, shape.rows_per_split(rows_count),
            ORDER=ctx.order, BLOCK_N=shape.block_n, BLOCK_D=shape.block_d, num_warps=shape.num_warps)
        return grad, None
