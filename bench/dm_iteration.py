"""Time one DM iteration: the engine's batched step vs the published-style per-class eager loop.

    python -m bench.dm_iteration [--quick] [--out PATH]

Cases: CIFAR-10 shapes (10 classes, 3×32×32, batch_real 256, IPC 10 and 50), TinyImageNet
shapes (200 classes, 3×64×64, IPC 10 and 50), and "host-200cls": 200 classes of 1×8×8 images,
IPC 1, batch_real 2, so little device work that its time is the per-iteration host overhead
(Python, launches, syncs) that the per-class loops of a 200-class data set pay. The real data is a random uint8 stand-in of the
right shape (CIFAR-10 and TinyImageNet are not needed to time an iteration); every row says so.
"ours" is `condense_engine.methods.dm.DM.step` (class sampler gather, Siamese DSA grouped by op,
ConvNetBank, one ops.mmd); "eager" is bench/baselines/dm_per_class.py; "compile" is the eager
loop with its network wrapped in torch.compile.
"""
import argparse

import torch

from bench import common
from bench.baselines.dm_per_class import dm_iteration_per_class
from condense_engine.datasets import ClassSampler, from_tensors
from condense_engine.methods.dm import DM
from condense_engine.synset import SyntheticSet

FULL_CASES = [  # name, classes, channels, size, ipc, batch_real
    ("cifar10-ipc10", 10, 3, 32, 10, 256),
    ("cifar10-ipc50", 10, 3, 32, 50, 256),
    ("tiny-ipc10", 200, 3, 64, 10, 256),
    ("tiny-ipc50", 200, 3, 64, 50, 256),
    ("host-200cls", 200, 1, 8, 1, 2),
]
QUICK_CASES = [("quick-ipc2", 3, 3, 16, 2, 8)]
STAND_IN = "random uint8 stand-in data of the real shape"


def _setup(classes, channels, size, ipc, batch_real, device):
    generator = torch.Generator().manual_seed(0)
    per_class = max(batch_real, ipc) + 4
    images = torch.randint(0, 256, (classes * per_class, channels, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    data = from_tensors(images, labels, name="standin")
    sampler = ClassSampler(data, device=device, generator=generator)
    init, init_labels = sampler.random_real(ipc, generator)
    return data, sampler, generator, init, init_labels


def measure_ours(case, device, peaks):
    name, classes, channels, size, ipc, batch_real = case
    data, sampler, generator, init, init_labels = _setup(classes, channels, size, ipc, batch_real, device)
    synset = SyntheticSet.from_tensors(init.clone(), init_labels, num_classes=classes, mean=data.mean, std=data.std)
    method = DM("standin", ipc, batch_real=batch_real)
    method.init(synset, data, sampler, generator, device)
    counter = iter(range(10**9))
    step = lambda: method.step(synset, next(counter))  # noqa: E731
    ms, memory, failure = common.measure(step, device, warmup=1, reps=5)
    return common.row("dm_iteration", name, "ours", ms, peak_mem_mb=memory, peaks=peaks, note=failure or STAND_IN)


def measure_eager(case, device, peaks, compiled: bool):
    name, classes, channels, size, ipc, batch_real = case
    data, sampler, generator, init, _ = _setup(classes, channels, size, ipc, batch_real, device)
    real_by_class = [data.normalized(torch.nonzero(data.labels == c).flatten()).to(device) for c in range(classes)]
    syn = init.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
    counter = iter(range(10**9))
    options = dict(ipc=ipc, batch_real=batch_real, strategy="color_crop_cutout_flip_scale_rotate",
                   channel=channels, im_size=(size, size))
    if compiled:
        import bench.baselines.dm_per_class as baseline

        original = baseline.ConvNet

        def compiled_convnet(*args, **kwargs):
            net = original(*args, **kwargs)
            net.embed = torch.compile(net.embed, dynamic=False)
            return net

        baseline.ConvNet = compiled_convnet
    try:
        step = lambda: dm_iteration_per_class(real_by_class, syn, optimizer, seed=next(counter), **options)  # noqa: E731
        ms, memory, failure = common.measure(step, device, warmup=1, reps=5)
    finally:
        if compiled:
            baseline.ConvNet = original
    return common.row("dm_iteration", name, "compile" if compiled else "eager", ms, peak_mem_mb=memory,
                      peaks=peaks, note=failure or STAND_IN)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--out", help="results file (default bench/results/dm_iteration.json)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peaks = common.device_peaks(device)
    rows = []
    for case in QUICK_CASES if args.quick else FULL_CASES:
        rows.append(measure_ours(case, device, peaks))
        rows.append(measure_eager(case, device, peaks, compiled=False))
        if args.no_compile or device.type == "cpu":
            rows.append(common.row("dm_iteration", case[0], "compile", None, note="skipped (CPU or --no-compile)"))
        else:
            rows.append(measure_eager(case, device, peaks, compiled=True))
        print(rows[-3:], flush=True)
    common.finish("dm_iteration_quick" if args.quick else "dm_iteration", rows, device, args.out)
    return rows


if __name__ == "__main__":
    main()
