"""Benchmark of ops.moments, per-class feature moments up to `order`: ours (the Triton kernels,
one launch over all classes each way) against the reference's definitions in eager mode and
under torch.compile, on the same features, forward and forward+backward.

    python -m bench.moments [--quick] [--out PATH] [--dtype fp32|bf16] [--no-compile]
                            [--cases NAME ...] [--order P]

Cases are the feature shapes of distribution matching: a real batch of every class (CIFAR-10,
TinyImageNet), the synthetic set of TinyImageNet IPC 50, and a memory-bound tall case. "fwd" is
the moments alone; "fwd+bwd" adds dL/dx for a given upstream gradient, the path that moves
synthetic images.

The op is memory-bound (a few FLOPs per element and order), so GB/s is the number to read: the
least bytes any implementation must move for x of C·N·d elements of e bytes (the (C, P, d)
output is small and not counted):
    fwd      C · N · d · e          read x once
    fwd+bwd  3 · C · N · d · e      read x in the forward and the backward, write dL/dx
Ours reads x twice in the forward (mean, then centred powers), which is not credited. FLOPs:
2·P per element forward, 4·P forward+backward, for order P.

--quick runs tiny shapes on the CPU (Triton in its interpreter, torch.compile skipped) as a
smoke test for CI; its times say nothing about speed.
"""
import torch

from bench import common
from condense_engine import ops
from condense_engine.reference import moments as reference

# (name, C, N, d)
FULL_CASES = [
    ("real_c10_n256_d2048", 10, 256, 2048),
    ("real_c200_n256_d2048", 200, 256, 2048),
    ("syn_c200_m50_d2048", 200, 50, 2048),
    ("tall_n65536_d128", 1, 65536, 128),
]
QUICK_CASES = [
    ("quick_c2_n24_d40", 2, 24, 40),
    ("quick_c1_n33_d7", 1, 33, 7),
]
MODES = ("fwd", "fwd+bwd")


def moments_function(impl: str, order: int):
    """f(x) → moments for one implementation."""
    if impl == "ours":
        return lambda x: ops.moments(x, order, backend="triton")

    def eager(x):
        return reference.moments(x, order)

    return eager if impl == "eager" else common.compiled(eager)


def measure(case, mode: str, impl: str, order: int, run: common.KernelRun) -> dict:
    """One result row (failures such as out-of-memory become a row with a note)."""
    name, classes, rows, dim = case
    elements = classes * rows * dim

    def build_step():
        generator = torch.Generator(device=run.device).manual_seed(0)
        x = torch.randn(classes, rows, dim, device=run.device, generator=generator).relu().to(run.dtype)
        x.requires_grad_(mode == "fwd+bwd")
        upstream = torch.randn(classes, order, dim, device=run.device, generator=generator)
        return common.grad_step(moments_function(impl, order), mode, (x,), (x,), upstream)

    return run.timed_row(f"{name}/p{order}/{mode}", impl, build_step,
                         interpreted=impl == "ours" and run.device.type == "cpu",
                         flops=(2.0 if mode == "fwd" else 4.0) * order * elements,
                         bytes_moved=(1.0 if mode == "fwd" else 3.0) * elements * run.dtype.itemsize)


def main(argv=None) -> list[dict]:
    parser = common.kernel_parser("moments", __doc__)
    parser.add_argument("--order", type=int, default=4, help="highest moment (default 4)")
    args = parser.parse_args(argv)
    run = common.kernel_run("moments", args)
    for case in run.chosen(QUICK_CASES if args.quick else FULL_CASES):
        for mode in MODES:
            for impl in ("ours", "eager", "compile"):
                run.record(measure(case, mode, impl, args.order, run))
    return run.finish()


if __name__ == "__main__":
    main()
