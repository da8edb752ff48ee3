"""Benchmark of the DM iteration's embedding work: k random ConvNets (instance norm, ReLU, average
pool) applied to one iteration's real and synthetic images.

    python -m bench.embed [--quick] [--out PATH] [--dtype fp32|bf16] [--no-compile]
                          [--cases NAME ...]
    python -m bench.embed --out bench/results/embed_cpu.json     # without a GPU: the CPU cases

One step = forward of the real images without gradients, then forward and backward of the
synthetic images to the images (the nets are frozen, as in DM), with DM's mean-embedding loss
Σ_k ‖mean real − mean syn‖² between them. Implementations, on the same weights and inputs:
  ours     ConvNetBank: all k nets in one pass (grouped convs) with the fused
           norm → ReLU → pool epilogue (ops.embed_epilogue: Triton on a GPU, the native C++
           kernel on a CPU)
  eager    a Python loop over k separate ConvNets
  compile  torch.compile of that loop
plus an ablation row (impl "ours", note "ablation") of the bank with the torch epilogue, which
separates the gain of batching the nets from the gain of the fused epilogue.

FLOPs count the convolutions only (norm, activation and pooling are < 2 %), per image and net
F = Σ_layers 2 · H_out · W_out · C_out · C_in · 9, so a step costs
    k · F · (n_real + 2 · n_syn)
since the backward to the input of a frozen net costs one more forward's worth (no weight
gradients). TFLOP/s is that count over the step time; pct_of_peak compares it with the TF32
tensor-core peak for fp32 (cuDNN runs fp32 convolutions in TF32 by default) or bf16's.

The "epilogue" cases time ops.embed_epilogue alone on one layer's conv output (n, C, H, W)
against the torch modules (eager and compiled), forward and forward+backward; their GB/s count
the least traffic any implementation needs (e = bytes per element, N = n·C·H·W):
    fwd      1.25 · N · e        read x, write the pooled output
    fwd+bwd  3.5 · N · e         the forward, then read x and the pooled gradient, write dx

Without a GPU the cases are CPU-sized: DM's CPU schedule on CIFAR-10 shapes (batch_real 64) and
the epilogue of one CPU chunk of its first block (models.layers.forward_chunk) and of an
evaluation batch's second block. --quick runs tiny shapes on the CPU (torch.compile skipped) as
a smoke test for CI; its times say nothing about speed.
"""
import torch

from bench import common
from condense_engine import ops
from condense_engine.models import ConvNetBank
from condense_engine.reference import embed as reference

# (name, k, width, depth, image side, n_real, n_syn): CIFAR-10 DM at IPC 50 (10 classes × 256
# real + 50 synthetic) and TinyImageNet-sized images.
FULL_NETWORK_CASES = [
    (f"dm_cifar10_ipc50_k{k}", k, 128, 3, 32, 2560, 500) for k in (1, 4, 8)
] + [
    (f"tiny64_n2048_k{k}", k, 128, 3, 64, 1792, 256) for k in (1, 4, 8)
]
CPU_NETWORK_CASES = [("dm_cifar10_ipc10_real64_k1", 1, 128, 3, 32, 640, 100)]
QUICK_NETWORK_CASES = [("quick_k3_w8_s8", 3, 8, 2, 8, 6, 4), ("quick_k1_w8_s10", 1, 8, 2, 10, 5, 3)]
# (name, n, C, H, W): one layer's conv output; the first layer of DM's synthetic half at k = 4.
FULL_EPILOGUE_CASES = [("epilogue_n500_c512_s32", 500, 512, 32, 32),
                       ("epilogue_n500_c512_s8", 500, 512, 8, 8)]
CPU_EPILOGUE_CASES = [("epilogue_n20_c128_s32", 20, 128, 32, 32),
                      ("epilogue_n256_c128_s16", 256, 128, 16, 16)]
QUICK_EPILOGUE_CASES = [("quick_epilogue_n3_c8_s7", 3, 8, 7, 7)]
MODES = ("fwd", "fwd+bwd")


def conv_flops_per_image(channel: int, width: int, depth: int, side: int) -> float:
    """F: the convolution FLOPs of one ConvNet (3×3, padding 1, 2×2 pools) on one image."""
    total, in_channels = 0.0, channel
    for _ in range(depth):
        total += 2.0 * side * side * width * in_channels * 9
        in_channels, side = width, side // 2
    return total


def dm_loss(real_features: torch.Tensor, syn_features: torch.Tensor) -> torch.Tensor:
    """DM's loss on (k, n, d) features: squared distance of the mean embeddings, summed over k."""
    return (real_features.mean(1) - syn_features.mean(1)).float().square().sum()


def embedding_function(impl: str, bank: ConvNetBank, nets):
    """x → (k, n, d) features for one implementation."""
    if impl == "ours":
        return bank.embed

    def loop(x):
        return torch.stack([net.embed(x) for net in nets])

    return loop if impl == "eager" else common.compiled(loop)


def measure_network(case, impl: str, run: common.KernelRun, ablation: bool = False) -> dict:
    """One row for a network case: the time, TFLOP/s and peak memory of one DM step."""
    name, k, width, depth, side, n_real, n_syn = case
    device = run.device

    def build_step():
        generator = torch.Generator(device=device).manual_seed(0)
        bank = ConvNetBank(k, 3, width=width, depth=depth, im_size=(side, side),
                           generator=torch.Generator().manual_seed(0), device=device, dtype=run.dtype,
                           epilogue_backend="torch" if ablation else None)
        bank.requires_grad_(False)
        nets = [bank.net(i).requires_grad_(False) for i in range(k)] if impl != "ours" else None
        real = torch.randn(n_real, 3, side, side, device=device, generator=generator).to(run.dtype)
        syn = torch.randn(n_syn, 3, side, side, device=device, generator=generator).to(run.dtype)
        syn.requires_grad_(True)
        embed = embedding_function(impl, bank, nets)

        def step():
            with torch.no_grad():
                real_features = embed(real)
            return torch.autograd.grad(dm_loss(real_features, embed(syn)), (syn,))
        return step

    return run.timed_row(name, impl, build_step,
                         note="ablation: ConvNetBank with the torch epilogue" if ablation else None,
                         flops=k * conv_flops_per_image(3, width, depth, side) * (n_real + 2 * n_syn))


def measure_epilogue(case, mode: str, impl: str, run: common.KernelRun) -> dict:
    """One row for an epilogue case: ops.embed_epilogue (instance norm, ReLU, average pool)."""
    name, n, channels, height, width = case
    elements = n * channels * height * width
    device = run.device

    def build_step():
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, channels, height, width, device=device, generator=generator).to(run.dtype)
        weight = (1.0 + 0.1 * torch.randn(channels, device=device, generator=generator)).to(run.dtype)
        bias = (0.1 * torch.randn(channels, device=device, generator=generator)).to(run.dtype)
        upstream = torch.ones_like(reference.embed_epilogue(x, weight, bias, groups=channels))
        x.requires_grad_(mode == "fwd+bwd")
        if impl == "ours":
            def epilogue(t):
                return ops.embed_epilogue(t, weight, bias, groups=channels)
        else:
            def epilogue(t):
                return reference.embed_epilogue(t, weight, bias, groups=channels)
            if impl == "compile":
                epilogue = common.compiled(epilogue)
        return common.grad_step(epilogue, mode, (x,), (x,), upstream)

    return run.timed_row(f"{name}/{mode}", impl, build_step,
                         bytes_moved=(1.25 if mode == "fwd" else 3.5) * elements * run.dtype.itemsize)


def main(argv=None) -> list[dict]:
    args = common.kernel_parser("embed", __doc__).parse_args(argv)
    run = common.kernel_run("embed", args)
    on_cpu = run.device.type == "cpu"
    network_cases = QUICK_NETWORK_CASES if args.quick else CPU_NETWORK_CASES if on_cpu else FULL_NETWORK_CASES
    epilogue_cases = QUICK_EPILOGUE_CASES if args.quick else CPU_EPILOGUE_CASES if on_cpu else FULL_EPILOGUE_CASES
    for case in run.chosen(network_cases):
        for impl in ("ours", "eager", "compile"):
            run.record(measure_network(case, impl, run))
        run.record(measure_network(case, "ours", run, ablation=True), "ours (ablation)")
    for case in run.chosen(epilogue_cases):
        for mode in MODES:
            for impl in ("ours", "eager", "compile"):
                run.record(measure_epilogue(case, mode, impl, run))
    return run.finish()


if __name__ == "__main__":
    main()
