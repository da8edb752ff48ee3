"""Benchmark of ops.dsa: ours (the fused Triton kernels, and the native op where it is built for
the device) against the published-style eager chain (bench/baselines/dsa_published.py) and our
reference chain under torch.compile, on the same inputs and parameters, forward and
forward+backward.

    python -m bench.dsa [--quick] [--out PATH] [--dtype fp32|bf16] [--no-compile]
                        [--cases NAME ...] [--strategies all color rotate]

Strategies: "all" applies every group (mode "M", the fused kernels' dearest case: 16 bilinear
taps per pixel); "color" and "rotate" are single groups as mode "S" picks them (colour is the
reference's most kernel-heavy group, rotate needs the CPU-built grid in the published code).
Parameters are per image (siamese=False), drawn once per case from a fixed seed.

Rows: case "<shape>/<strategy>/<mode>" holds ours = Triton (what ops.dsa picks on a GPU), eager =
the published-style chain, compile = torch.compile of the reference; the native op's row is
the case "<shape>/<strategy>/<mode>/native" (impl "ours"), since a report keeps one row per
implementation and case.

Bytes are the least any implementation must move (e = bytes per element, N = n·C·H·W), so GB/s
is an effective bandwidth, comparable with the HBM peak in pct_of_peak:
    fwd      2·N·e      read x, write the output
    fwd+bwd  4·N·e      the forward, then read the output gradient and write dL/dx
Not credited: the colour pre-reduction's extra read of x (ours), the backward's fp32 scatter
buffer (ours: zero-fill, atomic adds, one read in the epilogue), the published chain's
intermediates and its CPU→device grid copy (n·H·W·2·4 bytes per resampling group). No FLOPs
are counted: the op is memory-bound.

--quick runs tiny shapes on the CPU (Triton in its interpreter, the native CPU op, the
published-style chain; torch.compile skipped) as a smoke test for CI; its times say nothing
about speed.
"""
import torch

from bench import common
from bench.baselines.dsa_published import published_dsa
from condense_engine import ops
from condense_engine._extension import has_native
from condense_engine.ops.dsa import GROUPS, NATIVE_DEVICES, DSAParams, native_dsa
from condense_engine.reference import dsa as reference

# (name, n, C, H, W)
FULL_CASES = [
    ("cifar_n256_3x32x32", 256, 3, 32, 32),
    ("cifar_n25600_3x32x32", 25600, 3, 32, 32),
    ("tiny_n256_3x64x64", 256, 3, 64, 64),
    ("tiny_n25600_3x64x64", 25600, 3, 64, 64),
]
QUICK_CASES = [
    ("quick_n2_3x12x12", 2, 3, 12, 12),
    ("quick_n3_1x9x7", 3, 1, 9, 7),
]
STRATEGIES = {"all": "_".join(GROUPS), "color": "color", "rotate": "rotate"}
MODES = ("fwd", "fwd+bwd")
# (impl, variant) in the order they are measured; the variant names the row's note.
IMPLS = (("ours", "triton"), ("eager", "published"), ("compile", "reference"),
         ("ours", "native"))
NOTES = {
    "triton": "triton (kernels/augment.py)",
    "native": "native op (csrc/ops)",
    "published": "published style: per-op tensors, affine_grid on the CPU + grid copy",
    "reference": "torch.compile of condense_engine/reference/dsa.py",
}


def byte_count(mode: str, n: int, channels: int, height: int, width: int,
               element_size: int) -> float:
    """Least bytes one call must move (see the module docstring)."""
    passes = 2 if mode == "fwd" else 4
    return float(passes * n * channels * height * width * element_size)


def augment_function(variant: str, params: DSAParams):
    """f(x) → augmented x for one implementation, with `params` bound."""
    if variant == "triton":
        return lambda x: ops.dsa(x, params, backend="triton")
    if variant == "native":
        return lambda x: native_dsa(x, params)
    if variant == "published":
        on_cpu = params.to("cpu")
        return lambda x: published_dsa(x, on_cpu)
    return common.compiled(lambda x: reference.dsa(x, params), dynamic=False)


def native_note(device: torch.device) -> str:
    """The native row's note: which kernel, and whether ops.dsa trusts it yet."""
    verified = "" if device.type in NATIVE_DEVICES else ", not yet verified by tests"
    return f"{NOTES['native']}, {device.type}{verified}"


def measure(case, strategy: str, mode: str, impl: str, variant: str, run: common.KernelRun,
            timing: dict) -> dict:
    """One result row (failures such as out-of-memory become a row with a note)."""
    name, n, channels, height, width = case
    device = run.device

    def build_step():
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, channels, height, width, device=device, generator=generator).to(run.dtype)
        upstream = torch.randn(x.shape, device=device, generator=generator).to(run.dtype)
        x.requires_grad_(mode == "fwd+bwd")
        params = DSAParams.sample(n, STRATEGIES[strategy], size=(height, width), mode="M",
                                  siamese=False, seed=0, device=device)
        return common.grad_step(augment_function(variant, params), mode, (x,), (x,), upstream)

    return run.timed_row(f"{name}/{strategy}/{mode}" + ("/native" if variant == "native" else ""), impl,
                         build_step, note=native_note(device) if variant == "native" else NOTES[variant],
                         skip=has_native("dsa", device.type) if variant == "native" else None,
                         interpreted=variant == "triton" and device.type == "cpu", timing=timing,
                         bytes_moved=byte_count(mode, n, channels, height, width, run.dtype.itemsize))


def main(argv=None) -> list[dict]:
    parser = common.kernel_parser("dsa", __doc__)
    parser.add_argument("--strategies", nargs="+", choices=tuple(STRATEGIES),
                        default=list(STRATEGIES))
    args = parser.parse_args(argv)
    run = common.kernel_run("dsa", args)
    # The interpreter needs seconds per call: a few repetitions are enough for a smoke test.
    timing = dict(warmup=1, reps=2) if args.quick else {}
    for case in run.chosen(QUICK_CASES if args.quick else FULL_CASES):
        for strategy in args.strategies:
            for mode in MODES:
                for impl, variant in IMPLS:
                    run.record(measure(case, strategy, mode, impl, variant, run, timing), f"{impl} ({variant})")
    return run.finish()


if __name__ == "__main__":
    main()
