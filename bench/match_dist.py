"""Benchmark of ops.match_dist, DC's layer-wise gradient distance: ours (the Triton kernels, one
launch over every row of every layer and class) against the published per-parameter, per-class
loop in eager mode and under torch.compile, on the same gradients, forward and forward+backward.

    python -m bench.match_dist [--quick] [--out PATH] [--dtype fp32|bf16] [--no-compile]
                               [--cases NAME ...]

A case is one gradient-matching step of DC/DSA with `batched=True`: the real and synthetic
gradients of every parameter of a ConvNet, one per class, as dc.py's vmapped class gradients
give them. "fwd" is the distance alone; "fwd+bwd" adds its gradient with respect to the
synthetic gradients, the path of DC's image update.

The distance is memory-bound (about 6 FLOPs per element pair), so GB/s is the number to read:
the least bytes any implementation must move (P elements of weight gradients per side, e bytes
each; 1-D parameters are skipped by the metric and not counted):
    fwd      2 · P · e              read real and synthetic once
    fwd+bwd  5 · P · e              read both twice, write dL/dsyn
FLOPs: fwd 6·P (a product and two squares, summed), fwd+bwd 12·P.

--quick runs tiny shapes on the CPU (Triton in its interpreter, torch.compile skipped) as a
smoke test for CI; its times say nothing about speed.
"""
import torch

from bench import common
from condense_engine import ops
from condense_engine.models import get_model
from condense_engine.reference import match_dist as reference

# (name, classes C, image channels, image side, ConvNet depth, width)
FULL_CASES = [
    ("convnet3_cifar10_c10", 10, 3, 32, 3, 128),
    ("convnet3_cifar100_c100", 100, 3, 32, 3, 128),
    ("convnet4_tiny_c200", 200, 3, 64, 4, 128),
]
QUICK_CASES = [
    ("quick_convnet2_w8_c3", 3, 1, 12, 2, 8),
    ("quick_convnet1_w5_c2", 2, 3, 9, 1, 5),
]
MODES = ("fwd", "fwd+bwd")


def parameter_shapes(channels: int, side: int, depth: int, width: int, classes: int) -> list[tuple]:
    """The parameter shapes of the ConvNet DC trains for this case (biases and norms included)."""
    net = get_model("ConvNet", channels, classes, (side, side), depth=depth, width=width)
    return [tuple(p.shape) for p in net.parameters()]


def matched_elements(shapes: list[tuple]) -> int:
    """P: the elements of one class's weight gradients that the metric compares (≥ 2-D ones)."""
    return sum(torch.Size(shape).numel() for shape in shapes if len(shape) >= 2)


def distance_function(impl: str):
    """f(real, syn) → distance for one implementation."""
    if impl == "ours":
        return lambda real, syn: ops.match_dist(real, syn, batched=True, backend="triton")

    def eager(real, syn):
        return reference.match_dist(real, syn, "ours", batched=True)

    return eager if impl == "eager" else common.compiled(eager)


def measure(case, mode: str, impl: str, run: common.KernelRun) -> dict:
    """One result row (failures such as out-of-memory become a row with a note)."""
    name, classes, channels, side, depth, width = case
    shapes = parameter_shapes(channels, side, depth, width, classes)
    elements = classes * matched_elements(shapes)

    def build_step():
        generator = torch.Generator(device=run.device).manual_seed(0)
        real = [torch.randn(classes, *shape, device=run.device, generator=generator).to(run.dtype)
                for shape in shapes]
        syn = [(0.6 * r + 0.8 * torch.randn(r.shape, device=run.device, generator=generator).to(run.dtype))
               .requires_grad_(mode == "fwd+bwd" and r.dim() > 2) for r in real]  # 1-D ones do not enter the distance
        return common.grad_step(distance_function(impl), mode, (real, syn), [s for s in syn if s.requires_grad])

    return run.timed_row(f"{name}/{mode}", impl, build_step,
                         interpreted=impl == "ours" and run.device.type == "cpu",
                         flops=(6.0 if mode == "fwd" else 12.0) * elements,
                         bytes_moved=(2.0 if mode == "fwd" else 5.0) * elements * run.dtype.itemsize)


def main(argv=None) -> list[dict]:
    args = common.kernel_parser("match_dist", __doc__).parse_args(argv)
    run = common.kernel_run("match_dist", args)
    for case in run.chosen(QUICK_CASES if args.quick else FULL_CASES):
        for mode in MODES:
            for impl in ("ours", "eager", "compile"):
                run.record(measure(case, mode, impl, run))
    return run.finish()


if __name__ == "__main__":
    main()
