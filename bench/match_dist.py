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


def step_function(distance, mode: str, real: list, syn: list):
    """A no-argument callable running one timed step: the distance, plus dL/dsyn for fwd+bwd
    (for the synthetic gradients that require grad)."""
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return distance(real, syn)
        return forward

    def forward_backward():
        return torch.autograd.grad(distance(real, syn), [s for s in syn if s.requires_grad])
    return forward_backward


def measure(case, mode: str, impl: str, device: torch.device, dtype: torch.dtype, peaks: dict | None,
            compile_note: str | None) -> dict:
    """One result row (failures such as out-of-memory become a row with a note)."""
    name, classes, channels, side, depth, width = case
    shapes = parameter_shapes(channels, side, depth, width, classes)
    elements = classes * matched_elements(shapes)
    counts = dict(flops=(6.0 if mode == "fwd" else 12.0) * elements,
                  bytes_moved=(2.0 if mode == "fwd" else 5.0) * elements * dtype.itemsize,
                  peaks=peaks, dtype=dtype)
    label = f"{name}/{mode}"
    if impl == "compile" and compile_note:
        return common.row("match_dist", label, impl, None, note=f"skipped: {compile_note}", **counts)
    generator = torch.Generator(device=device).manual_seed(0)
    real = [torch.randn(classes, *shape, device=device, generator=generator).to(dtype) for shape in shapes]
    syn = [(0.6 * r + 0.8 * torch.randn(r.shape, device=device, generator=generator).to(dtype))
           .requires_grad_(mode == "fwd+bwd" and r.dim() > 2) for r in real]  # 1-D ones do not enter the distance
    step = step_function(distance_function(impl), mode, real, syn)
    ms, memory, note = common.measure(step, device, interpreted=impl == "ours" and device.type == "cpu")
    return common.row("match_dist", label, impl, ms, peak_mem_mb=memory, note=note, **counts)


def main(argv=None) -> list[dict]:
    args = common.kernel_parser("match_dist", __doc__).parse_args(argv)
    run = common.kernel_run("match_dist", args)
    rows = run.rows
    for case in run.chosen(QUICK_CASES if args.quick else FULL_CASES):
        for mode in MODES:
            for impl in ("ours", "eager", "compile"):
                rows.append(measure(case, mode, impl, run.device, run.dtype, run.peaks, run.compile_note))
                print(f"{rows[-1]['case']} {impl}: {rows[-1]['ms']} ms", flush=True)
    common.finish(run.name, rows, run.device, args.out)
    return rows


if __name__ == "__main__":
    main()
