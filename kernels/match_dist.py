"""Triton kernels of DC's layer-wise gradient distance: every row of every layer in one launch.

Layout ("flat with offsets"): the weight gradients of all layers (and all classes) are
flattened and concatenated into one vector per side; row r of the (output units, rest) view of
its layer starts at `row_start[r]` and has `row_length[r]` elements. A program takes BLOCK_R
consecutive rows (rows of different lengths mix freely: columns past a row's end are masked)
and walks their columns in BLOCK_K chunks, accumulating r·s, ‖r‖² and ‖s‖² in fp32 registers.
The forward writes each row's (dot, ‖r‖, ‖s‖) and its loss 1 − dot/(‖r‖‖s‖ + eps); torch sums
the row losses, which keeps the result deterministic.

Backward, with g the upstream gradient of a row and D = ‖r‖‖s‖ + eps:
    ∂/∂s = −g/D · r + g·dot·‖r‖/(‖s‖·D²) · s    (second term 0 where ‖s‖ = 0, as in torch)
and symmetrically for r. One program per BLOCK_R rows again, so each output element is written
by exactly one program (no atomics).
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _row_pointers(row_start_ptr, row_length_ptr, rows, BLOCK_R: tl.constexpr):
    """Row indices of this program, their validity, start offsets and lengths."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = row < rows
    start = tl.load(row_start_ptr + row, mask=valid, other=0)
    length = tl.load(row_length_ptr + row, mask=valid, other=0)
    return row, valid, start, length


@triton.jit
def _load_chunk(real_ptr, syn_ptr, start, length, column):
    """Columns `column` of every row of the block, real and syn in fp32 (0 past a row's end),
    with their offsets and mask for the stores of the backward."""
    inside = column[None, :] < length[:, None]
    offsets = start[:, None] + column[None, :]
    real = tl.load(real_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    syn = tl.load(syn_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    return real, syn, offsets, inside


@triton.jit
def _row_cosine_forward_kernel(real_ptr, syn_ptr, row_start_ptr, row_length_ptr, stats_ptr,
                               loss_ptr, rows, eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row, valid, start, length = _row_pointers(row_start_ptr, row_length_ptr, rows, BLOCK_R)
    columns = tl.arange(0, BLOCK_K)
    dot = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    real_sq = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    syn_sq = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for first in range(0, tl.max(length, axis=0), BLOCK_K):
        real, syn, offsets, inside = _load_chunk(real_ptr, syn_ptr, start, length, first + columns)
        dot += real * syn
        real_sq += real * real
        syn_sq += syn * syn
    row_dot = tl.sum(dot, axis=1)
    real_norm = tl.sqrt(tl.sum(real_sq, axis=1))
    syn_norm = tl.sqrt(tl.sum(syn_sq, axis=1))
    tl.store(stats_ptr + row, row_dot, mask=valid)
    tl.store(stats_ptr + rows + row, real_norm, mask=valid)
    tl.store(stats_ptr + 2 * rows + row, syn_norm, mask=valid)
    tl.store(loss_ptr + row, 1.0 - row_dot / (real_norm * syn_norm + eps), mask=valid)


@triton.jit
def _row_cosine_backward_kernel(real_ptr, syn_ptr, row_start_ptr, row_length_ptr, stats_ptr,
                                upstream_ptr, grad_real_ptr, grad_syn_ptr, rows, eps,
                                NEED_REAL: tl.constexpr, NEED_SYN: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row, valid, start, length = _row_pointers(row_start_ptr, row_length_ptr, rows, BLOCK_R)
    row_dot = tl.load(stats_ptr + row, mask=valid, other=0.0)
    real_norm = tl.load(stats_ptr + rows + row, mask=valid, other=0.0)
    syn_norm = tl.load(stats_ptr + 2 * rows + row, mask=valid, other=0.0)
    upstream = tl.load(upstream_ptr + row, mask=valid, other=0.0)
    denom = real_norm * syn_norm + eps
    cross = -upstream / denom
    scaled = upstream * row_dot / (denom * denom)
    real_self = tl.where(real_norm > 0, scaled * syn_norm / tl.where(real_norm > 0, real_norm, 1.0), 0.0)
    syn_self = tl.where(syn_norm > 0, scaled * real_norm / tl.where(syn_norm > 0, syn_norm, 1.0), 0.0)
    columns = tl.arange(0, BLOCK_K)
    for first in range(0, tl.max(length, axis=0), BLOCK_K):
        real, syn, offsets, inside = _load_chunk(real_ptr, syn_ptr, start, length, first + columns)
        if NEED_SYN:
            grad_syn = cross[:, None] * real + syn_self[:, None] * syn
            tl.store(grad_syn_ptr + offsets, grad_syn.to(grad_syn_ptr.dtype.element_ty), mask=inside)
        if NEED_REAL:
            grad_real = cross[:, None] * syn + real_self[:, None] * real
            tl.store(grad_real_ptr + offsets, grad_real.to(grad_real_ptr.dtype.element_ty), mask=inside)


@dataclass(frozen=True)
class RowTiles:
    """Rows per program, columns per chunk and warps of both kernels."""
    block_r: int
    block_k: int
    num_warps: int


def row_tiles(device: torch.device, block_r: int | None = None, block_k: int | None = None) -> RowTiles:
    """Launch shape for `device`; the CPU interpreter prefers few, large programs."""
    on_gpu = device.type == "cuda"
    return RowTiles(block_r or (4 if on_gpu else 32), block_k or (256 if on_gpu else 128),
                    4 if on_gpu else 1)


@functools.lru_cache(maxsize=64)
def row_layout(shapes: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_start int64, row_length int32) on `device` for matrices of the given (rows, length).

    Cached per shape signature, so a training loop pays the host-to-device copy once.
    """
    counts = torch.tensor([rows for rows, _ in shapes], dtype=torch.int64)
    lengths = torch.tensor([length for _, length in shapes], dtype=torch.int64)
    sizes = counts * lengths
    matrix_offset = torch.cumsum(sizes, 0) - sizes
    first_row = torch.cumsum(counts, 0) - counts
    row_length = lengths.repeat_interleave(counts)
    row_in_matrix = torch.arange(int(counts.sum())) - first_row.repeat_interleave(counts)
    row_start = matrix_offset.repeat_interleave(counts) + row_in_matrix * row_length
    return row_start.to(device), row_length.to(torch.int32).to(device)


class RowCosineDistance(torch.autograd.Function):
    """Per-row 1 − cos(r, s) of the flat layout; differentiable w.r.t. both flat vectors."""

    @staticmethod
    def forward(ctx, flat_real, flat_syn, row_start, row_length, eps: float, tiles: RowTiles):
        rows = row_start.numel()
        stats = torch.empty((3, rows), dtype=torch.float32, device=flat_syn.device)
        losses = torch.empty(rows, dtype=torch.float32, device=flat_syn.device)
        _row_cosine_forward_kernel[(triton.cdiv(rows, tiles.block_r),)](
            flat_real, flat_syn, row_start, row_length, stats, losses, rows, eps,
            BLOCK_R=tiles.block_r, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps)
        ctx.save_for_backward(flat_real, flat_syn, row_start, row_length, stats)
        ctx.eps, ctx.tiles = eps, tiles
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):
        flat_real, flat_syn, row_start, row_length, stats = ctx.saved_tensors
        need_real, need_syn = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_real = torch.empty_like(flat_real) if need_real else None
        grad_syn = torch.empty_like(flat_syn) if need_syn else None
        if need_real or need_syn:
            rows, tiles = row_start.numel(), ctx.tiles
            _row_cosine_backward_kernel[(triton.cdiv(rows, tiles.block_r),)](
                flat_real, flat_syn, row_start, row_length, stats, grad_losses.float().contiguous(),
                grad_real if need_real else flat_real, grad_syn if need_syn else flat_syn, rows, ctx.eps,
                NEED_REAL=need_real, NEED_SYN=need_syn, BLOCK_R=tiles.block_r, BLOCK_K=tiles.block_k,
                num_warps=tiles.num_warps)
        return grad_real, grad_syn, None, None, None, None


def layerwise_cosine_distance(grads_real: list, grads_syn: list, row_dims: int, eps: float,
                              block_r: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """Σ over all rows of 1 − cos for matching lists of gradients, in one launch each way.

    Each tensor is viewed as (rows, length) with its first `row_dims` dimensions as rows (1 for
    one parameter's (out, …) gradient, 2 for (classes, out, …)). Tensors must be non-empty
    lists of valid, pairwise equal shapes on one device; `block_r`/`block_k` override the tiles.
    """
    shapes = tuple((int(torch.Size(g.shape[:row_dims]).numel()), int(torch.Size(g.shape[row_dims:]).numel()))
                   for g in grads_syn)
    device = grads_syn[0].device
    if sum(rows for rows, _ in shapes) == 0:
        return torch.zeros((), dtype=torch.float32, device=device)
    row_start, row_length = row_layout(shapes, device)
    flat_real = torch.cat([g.reshape(-1) for g in grads_real])
    flat_syn = torch.cat([g.reshape(-1) for g in grads_syn])
    tiles = row_tiles(device, block_r, block_k)
    return RowCosineDistance.apply(flat_real, flat_syn, row_start, row_length, float(eps), tiles).sum()
