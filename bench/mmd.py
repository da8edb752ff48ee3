"""Benchmark of ops.mmd: ours (the Triton kernels) against the Gram-matrix reference in eager mode
and under torch.compile, on the same inputs, forward and forward+backward.

    python -m bench.mmd [--quick] [--out PATH] [--dtype fp32|bf16] [--tf32] [--no-compile]
                        [--cases NAME ...] [--kernels gaussian poly]

Modes: "fwd" is the full MMD² (include_xx=True) without gradients; "fwd+bwd" is the training
path of DM-style methods: include_xx=False, x (real features) constant, loss and dL/dy.

FLOP counts are the model FLOPs of the Gram formulation, the same for every implementation:
    fwd      C · 2d · (N² + M² + N·M)        the three Gram products
    fwd+bwd  C · 2d · (M² + N·M) · 2         the y–y and x–y Gram products, and the backward's
                                             (C, M, M+N) weights times the (M+N, d) features
Ours skips half of each symmetric x–x / y–y product in the forward and recomputes the Gram
tiles in the backward; neither is credited. The kernel function itself (O(N·M) element-wise)
is not counted. Bytes are the least any implementation must move (e = bytes per element), so
GB/s is an effective bandwidth:
    fwd      C · (N + M) · d · e             read x and y
    fwd+bwd  C · (2N + 3M) · d · e           read x and y twice, write dL/dy

--quick runs tiny shapes on the CPU (Triton in its interpreter, torch.compile skipped) as a
smoke test for CI; its times say nothing about speed.
"""
import torch

from bench import common
from condense_engine import ops
from condense_engine.reference import mmd as reference

# (name, C, N, M, d)
FULL_CASES = [
    ("dm_c10_n256_m10_d2048", 10, 256, 10, 2048),
    ("dm_c10_n256_m50_d2048", 10, 256, 50, 2048),
    ("dm_c200_n256_m10_d2048", 200, 256, 10, 2048),
    ("dm_c200_n256_m50_d2048", 200, 256, 50, 2048),
    ("square_n4096_d2048", 1, 4096, 4096, 2048),
    ("memory_bound_n8192_d128", 1, 8192, 8192, 128),
]
QUICK_CASES = [
    ("quick_c2_n24_m8_d40", 2, 24, 8, 40),
    ("quick_c1_n33_m5_d24", 1, 33, 5, 24),
]
KERNELS = {"gaussian": {}, "poly": dict(degree=3)}
MODES = ("fwd", "fwd+bwd")


def flop_count(mode: str, classes: int, n: int, m: int, dim: int) -> float:
    """Model FLOPs of one call (see the module docstring)."""
    if mode == "fwd":
        return classes * 2.0 * dim * (n * n + m * m + n * m)
    return classes * 2.0 * dim * (m * m + n * m) * 2


def byte_count(mode: str, classes: int, n: int, m: int, dim: int, element_size: int) -> float:
    """Least bytes one call must move (see the module docstring)."""
    rows = n + m if mode == "fwd" else 2 * n + 3 * m
    return float(classes * rows * dim * element_size)


def loss_function(impl: str, kernel: str, mode: str):
    """f(x, y) → loss for one implementation; None for torch.compile when it cannot run."""
    options = dict(KERNELS[kernel], include_xx=mode == "fwd")
    if impl == "ours":
        return lambda x, y: ops.mmd(x, y, kernel, backend="triton", **options)

    def eager(x, y):
        return reference.mmd(x, y, kernel, **options)

    return eager if impl == "eager" else common.compiled(eager)


def measure(case, kernel: str, mode: str, impl: str, run: common.KernelRun) -> dict:
    """One result row (failures such as out-of-memory become a row with a note)."""
    name, classes, n, m, dim = case

    def build_step():
        generator = torch.Generator(device=run.device).manual_seed(0)
        x = torch.randn(classes, n, dim, device=run.device, generator=generator).to(run.dtype)
        y = (0.9 * torch.randn(classes, m, dim, device=run.device, generator=generator) + 0.1).to(run.dtype)
        y.requires_grad_(mode == "fwd+bwd")
        return common.grad_step(loss_function(impl, kernel, mode), mode, (x, y), (y,))

    return run.timed_row(f"{name}/{kernel}/{mode}", impl, build_step,
                         interpreted=impl == "ours" and run.device.type == "cpu",
                         flops=flop_count(mode, classes, n, m, dim),
                         bytes_moved=byte_count(mode, classes, n, m, dim, run.dtype.itemsize))


def main(argv=None) -> list[dict]:
    parser = common.kernel_parser("mmd", __doc__)
    parser.add_argument("--tf32", action="store_true",
                        help="torch.set_float32_matmul_precision('high') for every impl")
    parser.add_argument("--kernels", nargs="+", choices=tuple(KERNELS), default=list(KERNELS))
    args = parser.parse_args(argv)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    run = common.kernel_run("mmd", args)
    for case in run.chosen(QUICK_CASES if args.quick else FULL_CASES):
        for kernel in args.kernels:
            for mode in MODES:
                for impl in ("ours", "eager", "compile"):
                    run.record(measure(case, kernel, mode, impl, run))
    return run.finish()


if __name__ == "__main__":
    main()
