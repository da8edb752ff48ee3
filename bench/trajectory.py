"""Trajectory matching: time and peak memory of one distillation iteration vs student steps.

    python -m bench.trajectory            # CIFAR-10 shapes (ConvNet-3, 32×32, 10 classes) on the GPU
    python -m bench.trajectory --quick    # tiny shapes on the CPU, a smoke run of the same code

One iteration = `ops.trajectory_match` (forward steps + gradient) with DSA, for memory modes
"unrolled" (published MTT), "exact" and "tesla", at IPC 10 (whole set per step, as published) and
IPC 50 (batch_syn 500 = the whole set in DATM's config). FLOPs: a ConvNet forward is counted
from its conv/linear layers (2·MACs per image); per student step the unrolled mode costs ≈ 9
forwards (forward 1, backward 2, backward of the backward ≈ 6; reference/ecosystem.md), the
exact and tesla modes ≈ 12 (the graph-free step, then a recomputed step and its double backward):
about 4/3 of the unrolled work for memory that does not grow with the steps.

`ops.unroll` is timed the same way on DD's shapes (IPC 10 split into S = 10 batches, 3 epochs:
30 steps at their own step sizes, the cross-entropy on a 1024-image real batch as the loss; the
terminal forward and backward add ≈ 3·1024 forwards), "unrolled" vs "exact".
"""
import argparse

import torch
import torch.nn.functional as F

from bench.common import Rows, device_peaks, measure, print_table, row
from condense_engine.models import FunctionalConvNet
from condense_engine.ops import trajectory_match, unroll
from condense_engine.ops.trajectory import dsa_augment

MODES = ("unrolled", "exact", "tesla")
FORWARDS_PER_STEP = {"unrolled": 9.0, "exact": 12.0, "tesla": 12.0}


def forward_flops(net: FunctionalConvNet, size: int) -> float:
    """FLOPs of one image's forward pass through the ConvNet's conv and linear layers."""
    config, flops, channels, side = net.config, 0.0, net.config["channel"], size
    for _ in range(config["depth"]):
        flops += 2.0 * channels * config["width"] * 9 * side * side
        channels = config["width"]
        if config["pool"] != "none":
            side //= 2
    return flops + 2.0 * net.feature_dim * net.num_classes


def run(quick: bool, device: torch.device, rows: list) -> list:
    """Append one row per (IPC, steps, mode) to `rows`; a case that fails (out of memory: the
    unrolled mode at many steps) gets a row saying so."""
    if quick:
        classes, size, width, depth = 4, 8, 16, 2
        cases, steps_list = [(2, 8)], (2, 4)
    else:
        classes, size, width, depth = 10, 32, 128, 3
        cases, steps_list = [(10, 100), (50, 500)], (10, 20, 40, 80)
    net = FunctionalConvNet(3, classes, width=width, depth=depth, im_size=(size, size))
    generator = torch.Generator().manual_seed(0)
    start = net.init_params(0, device=device)
    target = start + 0.01 * torch.randn(start.shape, generator=generator).to(device)
    lr = torch.tensor(0.01, device=device)
    augment = dsa_augment("color_crop_cutout_flip_scale_rotate")
    peaks = device_peaks(device)
    for ipc, batch_syn in cases:
        images = torch.randn(classes * ipc, 3, size, size, generator=generator).to(device)
        labels = torch.arange(classes, device=device).repeat_interleave(ipc)
        batch = min(batch_syn, len(images))
        for steps in steps_list:
            for memory in MODES:
                def iteration():
                    trajectory_match(images, labels, lr, start, target, net, steps=steps, batch_size=batch,
                                     memory=memory, augment=augment, seed=0)
                ms, memory_mb, failure = measure(iteration, device, warmup=1, reps=3)
                flops = FORWARDS_PER_STEP[memory] * steps * batch * forward_flops(net, size)
                note = f"{classes} classes {size}px ConvNet w{width} d{depth}, DSA"
                rows.append(row("trajectory", f"ipc{ipc}_batch{batch}_steps{steps}_{memory}", "ours", ms,
                                flops=flops, peak_mem_mb=memory_mb, peaks=peaks,
                                note=f"{note}; {failure}" if failure else note))
                print(f"{rows[-1]['case']}: {ms} ms, {memory_mb} MB", flush=True)
    return rows


def run_unroll(quick: bool, device: torch.device, rows: list) -> list:
    """Append one row per (steps, mode) of `ops.unroll` on DD's shapes to `rows`."""
    if quick:
        classes, size, width, depth, ipc, real_batch, epochs_list = 4, 8, 16, 2, 2, 16, (1, 2)
    else:
        classes, size, width, depth, ipc, real_batch, epochs_list = 10, 32, 128, 3, 10, 1024, (3, 6)
    net = FunctionalConvNet(3, classes, width=width, depth=depth, im_size=(size, size))
    generator = torch.Generator().manual_seed(1)
    start = net.init_params(0, device=device)
    images = torch.randn(classes * ipc, 3, size, size, generator=generator).to(device)
    labels = torch.arange(classes, device=device).repeat_interleave(ipc)
    real = torch.randn(real_batch, 3, size, size, generator=generator).to(device)
    real_labels = torch.arange(real_batch, device=device) % classes
    rows_per_step = torch.arange(classes * ipc, device=device).view(classes, ipc)
    batches = [rows_per_step[:, s] for s in range(ipc)]  # S = ipc batches of one image per class

    def terminal(params):
        return F.cross_entropy(net.forward(real, params), real_labels)

    peaks = device_peaks(device)
    for epochs in epochs_list:
        steps = epochs * len(batches)
        lrs = torch.full((steps,), 0.02, device=device)
        for memory in ("unrolled", "exact"):
            def iteration():
                unroll(images, labels, lrs, start, net, batches * epochs, terminal, memory=memory)
            ms, memory_mb, failure = measure(iteration, device, warmup=1, reps=3)
            flops = (FORWARDS_PER_STEP[memory] * steps * classes + 3 * real_batch) * forward_flops(net, size)
            note = f"DD: {classes} classes {size}px ConvNet w{width} d{depth}, real batch {real_batch}, no DSA"
            rows.append(row("trajectory", f"unroll_dd_ipc{ipc}_steps{steps}_{memory}", "ours", ms, flops=flops,
                            peak_mem_mb=memory_mb, peaks=peaks, note=f"{note}; {failure}" if failure else note))
            print(f"{rows[-1]['case']}: {ms} ms, {memory_mb} MB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CPU shapes (smoke test, < 60 s)")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/trajectory.json)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    rows = Rows("trajectory", device, args.out) if not args.quick or args.out else []
    benchmark_setting = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"  # restored for the benches run after
    try:
        run(args.quick, device, rows)
        run_unroll(args.quick, device, rows)
    finally:
        torch.backends.cudnn.benchmark = benchmark_setting
    print_table(rows)
    if isinstance(rows, Rows):
        print(f"wrote {rows.path}")


if __name__ == "__main__":
    main()
