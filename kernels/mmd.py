"""Triton kernel MMD² (poly and Gaussian kernels), forward and backward, tiled like FlashAttention.

Programs run over (block of rows, class), so one launch covers every class. A program takes
BLOCK rows of one feature set (the "queries") and walks over BLOCK-row tiles of the "keys": their
inner products come from `tl.dot` over chunks of BLOCK_D features, the kernel function and the
masks are applied in registers, and only a per-program partial sum (forward) or the program's own
rows of the gradient (backward) reach memory: no N×M or N×N matrix is ever stored.

Forward: a program over rows of x sums α_xx·k(x_i, x·) (when include_xx) and −2α_xy·k(x_i, y·);
a program over rows of y sums α_yy·k(y_j, y·). The x–x and y–y sums use symmetry (tiles at or
right of the diagonal, off-diagonal tiles counted twice). Partials land in a (C, programs)
buffer that torch sums afterwards, which keeps the result deterministic.

Backward: for queries q (y, and x when it needs a gradient) with the other set o,
dL/dq_i = g_c·(2α_same Σ_i' ∂₁k(q_i, q_i') − 2α_xy Σ_j ∂₁k(q_i, o_j)), where ∂₁k(a, b) = s(a, b)·b
(poly: s = pγ(γ⟨a,b⟩+c)^(p−1)) or s(a, b)·(b − a) (Gaussian: s = mean_σ k_σ/σ²). Per key tile the
slopes S form a register tile and the gradient gains S·keys (one more `tl.dot`); the Gaussian's
−(Σ_j S_ij)·q_i part is added once at the end. When d fits one chunk the gradient rows stay in
registers; otherwise each program accumulates into its own rows of an fp32 buffer, chunk by chunk
(no other program touches them, so no atomics).
"""
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

POLY = tl.constexpr(0)
GAUSSIAN = tl.constexpr(1)
KERNEL_IDS = {"poly": POLY.value, "gaussian": GAUSSIAN.value}
LN2 = tl.constexpr(math.log(2.0))
# Largest feature chunk kept whole in registers on a GPU (the backward's accumulator is BLOCK×d).
MAX_ONE_CHUNK_DIM = 128


@triton.jit
def _gram_tile(q_ptr, k_ptr, rows, cols, q_count, k_count, dim, BLOCK: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FP32_DOT: tl.constexpr):
    """⟨q_i, k_j⟩ for one BLOCK×BLOCK tile, accumulated in fp32 over chunks of BLOCK_D features.

    FP32_DOT upcasts the operands first: the CPU interpreter multiplies bf16 as raw integers.
    """
    offs_d = tl.arange(0, BLOCK_D)
    inner = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        feature = start + offs_d
        in_dim = feature[None, :] < dim
        q = tl.load(q_ptr + rows[:, None] * dim + feature[None, :],
                    mask=(rows[:, None] < q_count) & in_dim, other=0.0)
        k = tl.load(k_ptr + cols[:, None] * dim + feature[None, :],
                    mask=(cols[:, None] < k_count) & in_dim, other=0.0)
        if FP32_DOT:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        inner = tl.dot(q, tl.trans(k), inner, input_precision=PRECISION)
    return inner


@triton.jit
def _squared_distance(inner, q_sq, k_sq):
    """‖q_i − k_j‖² from the inner products and precomputed squared norms, clamped at zero."""
    return tl.maximum(q_sq[:, None] + k_sq[None, :] - 2.0 * inner, 0.0)


@triton.jit
def _kernel_value(inner, q_sq, k_sq, scales_ptr, gamma, coef0, KERNEL: tl.constexpr,
                  DEGREE: tl.constexpr, NUM_SIGMAS: tl.constexpr):
    """k(q_i, k_j) on a tile: (γ⟨q,k⟩+c)^p, or the mean over σ of exp(−‖q−k‖²/(2σ²))."""
    if KERNEL == POLY:
        base = gamma * inner + coef0
        value = base
        for _ in tl.static_range(DEGREE - 1):
            value = value * base
    else:
        sq_dist = _squared_distance(inner, q_sq, k_sq)
        value = tl.zeros_like(inner)
        for s in tl.static_range(NUM_SIGMAS):
            value += tl.exp2(-sq_dist * tl.load(scales_ptr + s))
        value = value / NUM_SIGMAS
    return value


@triton.jit
def _kernel_slope(inner, q_sq, k_sq, scales_ptr, gamma, coef0, KERNEL: tl.constexpr,
                  DEGREE: tl.constexpr, NUM_SIGMAS: tl.constexpr):
    """s(q_i, k_j) with ∂k/∂q = s·k (poly) or s·(k − q) (Gaussian); see the module docstring."""
    if KERNEL == POLY:
        base = gamma * inner + coef0
        power = tl.full(inner.shape, 1.0, tl.float32)
        for _ in tl.static_range(DEGREE - 1):
            power = power * base
        slope = (DEGREE * gamma) * power
    else:
        sq_dist = _squared_distance(inner, q_sq, k_sq)
        slope = tl.zeros_like(inner)
        for s in tl.static_range(NUM_SIGMAS):
            scale = tl.load(scales_ptr + s)
            # scale = log2(e)/(2σ²), so 1/σ² = 2·scale·ln 2.
            slope += tl.exp2(-sq_dist * scale) * (2.0 * LN2 * scale)
        slope = slope / NUM_SIGMAS
    return slope


@triton.jit(do_not_specialize=["n", "m"])
def _mmd_forward_kernel(x_ptr, y_ptr, x_sq_ptr, y_sq_ptr, scales_ptr, partial_ptr, n, m, dim,
                        coef_xx, coef_yy, coef_xy, gamma, coef0,
                        INCLUDE_XX: tl.constexpr, UNBIASED: tl.constexpr, KERNEL: tl.constexpr,
                        DEGREE: tl.constexpr, NUM_SIGMAS: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                        FP32_DOT: tl.constexpr):
    """One program: the weighted kernel sum of one block of rows of x or y, for one class."""
    program = tl.program_id(0)
    cls = tl.program_id(1).to(tl.int64)
    x_ptr += cls * n * dim
    y_ptr += cls * m * dim
    x_sq_ptr += cls * n
    y_sq_ptr += cls * m
    x_blocks = tl.cdiv(n, BLOCK)
    if program < x_blocks:
        q_ptr, q_sq_ptr, q_count, o_ptr, o_sq_ptr, o_count = x_ptr, x_sq_ptr, n, y_ptr, y_sq_ptr, m
        row_block = program
        coef_same = coef_xx
        coef_other = -2.0 * coef_xy
        first = program if INCLUDE_XX else x_blocks
        last = x_blocks + tl.cdiv(m, BLOCK)
    else:
        q_ptr, q_sq_ptr, q_count, o_ptr, o_sq_ptr, o_count = y_ptr, y_sq_ptr, m, x_ptr, x_sq_ptr, n
        row_block = program - x_blocks
        coef_same = coef_yy
        coef_other = coef_xy * 0.0
        first = row_block
        last = tl.cdiv(m, BLOCK)
    same_blocks = tl.cdiv(q_count, BLOCK)
    rows = row_block * BLOCK + tl.arange(0, BLOCK)
    q_sq = tl.load(q_sq_ptr + rows, mask=rows < q_count, other=0.0)
    total = 0.0
    for key_block in range(first, last):
        if key_block < same_blocks:
            k_ptr, k_sq_ptr, k_count = q_ptr, q_sq_ptr, q_count
            col_block = key_block
            weight = coef_same * tl.where(key_block == row_block, 1.0, 2.0)
        else:
            k_ptr, k_sq_ptr, k_count = o_ptr, o_sq_ptr, o_count
            col_block = key_block - same_blocks
            weight = coef_other
        cols = col_block * BLOCK + tl.arange(0, BLOCK)
        inner = _gram_tile(q_ptr, k_ptr, rows, cols, q_count, k_count, dim, BLOCK, BLOCK_D,
                           PRECISION, FP32_DOT)
        k_sq = tl.load(k_sq_ptr + cols, mask=cols < k_count, other=0.0)
        value = _kernel_value(inner, q_sq, k_sq, scales_ptr, gamma, coef0, KERNEL, DEGREE,
                              NUM_SIGMAS)
        valid = (rows[:, None] < q_count) & (cols[None, :] < k_count)
        if UNBIASED:
            valid = valid & ((rows[:, None] != cols[None, :]) | (key_block >= same_blocks))
        total += weight * tl.sum(tl.where(valid, value, 0.0))
    tl.store(partial_ptr + cls * tl.num_programs(0) + program, total)


@triton.jit(do_not_specialize=["q_count", "o_count"])
def _mmd_backward_kernel(q_ptr, o_ptr, q_sq_ptr, o_sq_ptr, grad_ptr, upstream_ptr, scales_ptr,
                         q_count, o_count, dim, coef_same, coef_other, gamma, coef0,
                         HAS_SAME: tl.constexpr, UNBIASED: tl.constexpr, KERNEL: tl.constexpr,
                         DEGREE: tl.constexpr, NUM_SIGMAS: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                         FP32_DOT: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """One program: the fp32 gradient of one block of query rows q, for one class."""
    row_block = tl.program_id(0)
    cls = tl.program_id(1).to(tl.int64)
    q_ptr += cls * q_count * dim
    grad_ptr += cls * q_count * dim
    o_ptr += cls * o_count * dim
    q_sq_ptr += cls * q_count
    o_sq_ptr += cls * o_count
    upstream = tl.load(upstream_ptr + cls)
    coef_same = coef_same * upstream
    coef_other = coef_other * upstream
    same_blocks = tl.cdiv(q_count, BLOCK)
    first = 0 if HAS_SAME else same_blocks
    last = same_blocks + tl.cdiv(o_count, BLOCK)
    rows = row_block * BLOCK + tl.arange(0, BLOCK)
    row_valid = rows < q_count
    q_sq = tl.load(q_sq_ptr + rows, mask=row_valid, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    if ONE_CHUNK:
        acc = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    slope_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for key_block in range(first, last):
        if key_block < same_blocks:
            k_ptr, k_sq_ptr, k_count = q_ptr, q_sq_ptr, q_count
            col_block = key_block
            weight = coef_same
        else:
            k_ptr, k_sq_ptr, k_count = o_ptr, o_sq_ptr, o_count
            col_block = key_block - same_blocks
            weight = coef_other
        cols = col_block * BLOCK + tl.arange(0, BLOCK)
        col_valid = cols < k_count
        inner = _gram_tile(q_ptr, k_ptr, rows, cols, q_count, k_count, dim, BLOCK, BLOCK_D,
                           PRECISION, FP32_DOT)
        k_sq = tl.load(k_sq_ptr + cols, mask=col_valid, other=0.0)
        slope = _kernel_slope(inner, q_sq, k_sq, scales_ptr, gamma, coef0, KERNEL, DEGREE,
                              NUM_SIGMAS)
        valid = row_valid[:, None] & col_valid[None, :]
        if UNBIASED:
            valid = valid & ((rows[:, None] != cols[None, :]) | (key_block >= same_blocks))
        # The weight multiplies after the dot so fp16 slopes do not underflow (α ~ 1/(N·M)).
        slope = tl.where(valid, slope, 0.0)
        if KERNEL == GAUSSIAN:
            slope_sum += weight * tl.sum(slope, axis=1)
        if ONE_CHUNK:
            keys = tl.load(k_ptr + cols[:, None] * dim + offs_d[None, :],
                           mask=col_valid[:, None] & (offs_d[None, :] < dim), other=0.0)
            if FP32_DOT:
                keys = keys.to(tl.float32)
            acc += weight * tl.dot(slope.to(keys.dtype), keys, input_precision=PRECISION)
        else:
            for start in range(0, dim, BLOCK_D):
                feature = start + offs_d
                keys = tl.load(k_ptr + cols[:, None] * dim + feature[None, :],
                               mask=col_valid[:, None] & (feature[None, :] < dim), other=0.0)
                if FP32_DOT:
                    keys = keys.to(tl.float32)
                grad_ptrs = grad_ptr + rows[:, None] * dim + feature[None, :]
                grad_mask = row_valid[:, None] & (feature[None, :] < dim)
                partial = tl.load(grad_ptrs, mask=grad_mask, other=0.0)
                partial += weight * tl.dot(slope.to(keys.dtype), keys,
                                           input_precision=PRECISION)
                tl.store(grad_ptrs, partial, mask=grad_mask)
            # The next key tile re-reads these rows, maybe from other threads of the program.
            tl.debug_barrier()
    if ONE_CHUNK:
        grad_mask = row_valid[:, None] & (offs_d[None, :] < dim)
        if KERNEL == GAUSSIAN:
            queries = tl.load(q_ptr + rows[:, None] * dim + offs_d[None, :], mask=grad_mask,
                              other=0.0)
            acc -= slope_sum[:, None] * queries.to(tl.float32)
        tl.store(grad_ptr + rows[:, None] * dim + offs_d[None, :], acc, mask=grad_mask)
    elif KERNEL == GAUSSIAN:
        for start in range(0, dim, BLOCK_D):
            feature = start + offs_d
            grad_mask = row_valid[:, None] & (feature[None, :] < dim)
            queries = tl.load(q_ptr + rows[:, None] * dim + feature[None, :], mask=grad_mask,
                              other=0.0)
            grad_ptrs = grad_ptr + rows[:, None] * dim + feature[None, :]
            partial = tl.load(grad_ptrs, mask=grad_mask, other=0.0)
            tl.store(grad_ptrs, partial - slope_sum[:, None] * queries.to(tl.float32),
                     mask=grad_mask)


@dataclass(frozen=True)
class TileConfig:
    """Launch shape: rows per tile, features per chunk, whether d fits one chunk, warps, and
    whether tl.dot gets fp32 operands (in the CPU interpreter, whose bf16 dot is wrong)."""
    block: int
    block_d: int
    one_chunk: bool
    num_warps: int
    fp32_dot: bool


def tile_config(dim: int, device: torch.device, block: int | None = None,
                block_d: int | None = None) -> TileConfig:
    """Tile sizes for feature size `dim`; `block`/`block_d` override (tests use small tiles)."""
    on_gpu = device.type == "cuda"
    whole = max(16, triton.next_power_of_2(dim))
    if block is None:
        block = 64 if on_gpu else 16
    if block_d is None:
        limit = MAX_ONE_CHUNK_DIM if on_gpu else 64
        block_d = whole if whole <= limit else (64 if on_gpu else 32)
    return TileConfig(block, block_d, block_d >= dim, 4 if on_gpu else 1, not on_gpu)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 inputs, following torch's float32 matmul setting.

    "highest" (torch's default) → 3×TF32, which is fp32-accurate on tensor cores; "high" or
    "medium" → plain TF32. Ignored by tl.dot for bf16/fp16 inputs.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


@dataclass(frozen=True)
class KernelSpec:
    """Everything about the loss except the features: kernel, its parameters, estimator."""
    kernel: int
    degree: int
    gamma: float
    coef0: float
    scales: torch.Tensor
    unbiased: bool
    include_xx: bool

    def pair_coefficients(self, n: int, m: int) -> tuple[float, float, float]:
        """(α_xx, α_yy, α_xy): the factors that turn the pair sums into means."""
        if self.unbiased:
            return 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1)), 1.0 / (n * m)
        return 1.0 / (n * n), 1.0 / (m * m), 1.0 / (n * m)


def _launch_backward(queries, others, q_sq, o_sq, upstream, spec: KernelSpec, tiles: TileConfig,
                     coef_same: float, coef_other: float, has_same: bool) -> torch.Tensor:
    """fp32 gradient w.r.t. `queries` (C, Q, d); see _mmd_backward_kernel."""
    classes, q_count, dim = queries.shape
    grad = torch.zeros(queries.shape, dtype=torch.float32, device=queries.device)
    grid = (triton.cdiv(q_count, tiles.block), classes)
    _mmd_backward_kernel[grid](
        queries, others, q_sq, o_sq, grad, upstream, spec.scales, q_count, others.shape[1], dim,
        coef_same, coef_other, spec.gamma, spec.coef0,
        HAS_SAME=has_same, UNBIASED=spec.unbiased, KERNEL=spec.kernel, DEGREE=spec.degree,
        NUM_SIGMAS=spec.scales.numel(), BLOCK=tiles.block, BLOCK_D=tiles.block_d,
        PRECISION=dot_precision(queries.dtype), FP32_DOT=tiles.fp32_dot,
        ONE_CHUNK=tiles.one_chunk,
        num_warps=tiles.num_warps)
    return grad


class TiledMMD(torch.autograd.Function):
    """Per-class MMD² (C,) of x (C, N, d) and y (C, M, d) with the tiled forward and backward."""

    @staticmethod
    def forward(ctx, x, y, spec: KernelSpec, tiles: TileConfig):
        classes, n, dim = x.shape
        m = y.shape[1]
        x_sq = x.float().pow(2).sum(-1)
        y_sq = y.float().pow(2).sum(-1)
        coef_xx, coef_yy, coef_xy = spec.pair_coefficients(n, m)
        programs = triton.cdiv(n, tiles.block) + triton.cdiv(m, tiles.block)
        partial = torch.empty((classes, programs), dtype=torch.float32, device=x.device)
        _mmd_forward_kernel[(programs, classes)](
            x, y, x_sq, y_sq, spec.scales, partial, n, m, dim, coef_xx, coef_yy, coef_xy,
            spec.gamma, spec.coef0,
            INCLUDE_XX=spec.include_xx, UNBIASED=spec.unbiased, KERNEL=spec.kernel,
            DEGREE=spec.degree, NUM_SIGMAS=spec.scales.numel(), BLOCK=tiles.block,
            BLOCK_D=tiles.block_d, PRECISION=dot_precision(x.dtype), FP32_DOT=tiles.fp32_dot,
            num_warps=tiles.num_warps)
        ctx.save_for_backward(x, y, x_sq, y_sq)
        ctx.spec, ctx.tiles = spec, tiles
        return partial.sum(dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_per_class):
        x, y, x_sq, y_sq = ctx.saved_tensors
        spec, tiles = ctx.spec, ctx.tiles
        upstream = grad_per_class.float().contiguous()
        coef_xx, coef_yy, coef_xy = spec.pair_coefficients(x.shape[1], y.shape[1])
        grad_x = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_x = _launch_backward(x, y, x_sq, y_sq, upstream, spec, tiles, 2.0 * coef_xx,
                                      -2.0 * coef_xy, spec.include_xx).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_y = _launch_backward(y, x, y_sq, x_sq, upstream, spec, tiles, 2.0 * coef_yy,
                                      -2.0 * coef_xy, True).to(y.dtype)
        return grad_x, grad_y, None, None


def mmd_per_class(x: torch.Tensor, y: torch.Tensor, kernel: str, *, degree: int, gamma: float,
                  coef0: float, sigmas: torch.Tensor | None, unbiased: bool, include_xx: bool,
                  block: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """Per-class MMD² (C,) fp32 for valid x (C, N, d), y (C, M, d) of one dtype and device.

    `kernel` is "poly" or "gaussian" (`sigmas`: 1-D tensor of bandwidths); differentiable
    w.r.t. x and y. `block`/`block_d` override the tile sizes.
    """
    longest = max(x.shape[1], y.shape[1]) * x.shape[2]
    if longest >= 2**31:
        raise ValueError(f"each class's x and y must hold fewer than 2**31 elements for the "
                         f"Triton kernels' 32-bit row offsets, got {longest}")
    if kernel == "gaussian":
        scales = (math.log2(math.e) / (2.0 * sigmas.float() ** 2)).contiguous()
    else:
        scales = torch.zeros(1, dtype=torch.float32, device=x.device)
    spec = KernelSpec(KERNEL_IDS[kernel], int(degree), float(gamma), float(coef0), scales,
                      bool(unbiased), bool(include_xx))
    tiles = tile_config(x.shape[-1], x.device, block, block_d)
    return TiledMMD.apply(x.contiguous(), y.contiguous(), spec, tiles)
