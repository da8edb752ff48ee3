"""Time one DM or M3D iteration: the engine's batched step vs the published-style per-class eager loop.

    python -m bench.dm_iteration [--method dm|m3d|both] [--quick] [--out PATH] [--no-compile]

Cases: CIFAR-10 shapes (10 classes, 3×32×32, batch_real 256, IPC 10 and 50), TinyImageNet
shapes (200 classes, 3×64×64, IPC 10 and 50), and "host-200cls": 200 classes of 1×8×8 images,
IPC 1, batch_real 2, so little device work that its time is the per-iteration host overhead
(Python, launches, syncs) that the per-class loops of a 200-class data set pay. The real data is a random uint8 stand-in of the
right shape (CIFAR-10 and TinyImageNet are not needed to time an iteration); every row says so.
"ours" is `condense_engine.methods.dm.DM.step` (class sampler gather, Siamese DSA grouped by op,
ConvNetBank, one ops.mmd); "eager" is bench/baselines/dm_per_class.py; "compile" is the eager
loop with its network wrapped in torch.compile. DM's TinyImageNet IPC 50 case is timed once more
with the real images streamed from the host (`real_images_on="host"`, case "tiny-ipc50-streamed",
ours only): the price of a set larger than the device's memory.

--method m3d times `condense_engine.methods.dm.M3D.step` with its defaults (Gaussian kernel,
bandwidths σ₀·(0.5, 1, 2), no real–real term, normalised) against the same per-class loop with
the Gaussian-kernel MMD² from explicit Gram matrices per class (σ₀ from that class's real
features; the published loop has no normalisation, one scalar division in ours). Its rows carry
bench "m3d_iteration". --method both (the default, what `python -m bench` runs) writes both
methods' rows to dm_iteration.json; --method m3d alone writes m3d_iteration.json. M3D's explicit
moment-matching variant (`kernel="moments"`, mean and variance through ops.moments, no Gram
matrix) is timed once more per case as "<case>-moments" (ours only: the published loop has no
such loss), beside the Gaussian kernel's row.
"""
import argparse
import functools

import torch

from bench import common
from bench.baselines.dm_per_class import dm_iteration_per_class
from condense_engine.datasets import ClassSampler, from_tensors
from condense_engine.methods.dm import DM, M3D
from condense_engine.synset import SyntheticSet

FULL_CASES = [  # name, classes, channels, size, ipc, batch_real
    ("cifar10-ipc10", 10, 3, 32, 10, 256),
    ("cifar10-ipc50", 10, 3, 32, 50, 256),
    ("tiny-ipc10", 200, 3, 64, 10, 256),
    ("tiny-ipc50", 200, 3, 64, 50, 256),
    ("host-200cls", 200, 1, 8, 1, 2),
]
QUICK_CASES = [("quick-ipc2", 3, 3, 16, 2, 8)]
#: DM cases timed again with the real images streamed from the host.
STREAMED_CASES = ("tiny-ipc50", "quick-ipc2")
# CPU repetitions after common.measure's untimed first call (CUDA times with do_bench instead).
FULL_TIMING, QUICK_TIMING = dict(warmup=1, reps=5), dict(warmup=0, reps=2)
STAND_IN = "random uint8 stand-in data of the real shape"
#: --method → (engine method, bench name of its rows, kernel of the per-class baseline loss).
METHODS = {"dm": (DM, "dm_iteration", "linear"), "m3d": (M3D, "m3d_iteration", "gaussian")}
#: --method → (case suffix, options) of variants timed as ours only, beside the default's rows.
VARIANTS = {"m3d": [("moments", dict(kernel="moments"))]}


def _setup(classes, channels, size, ipc, batch_real, device, images_on="device"):
    generator = torch.Generator().manual_seed(0)
    per_class = max(batch_real, ipc) + 4
    images = torch.randint(0, 256, (classes * per_class, channels, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    data = from_tensors(images, labels, name="standin")
    sampler = ClassSampler(data, device=device, generator=generator, images_on=images_on)
    init, init_labels = sampler.random_real(ipc, generator)
    return data, sampler, generator, init, init_labels


def measure_ours(case, method_name, device, peaks, timing: dict, images_on="device", variant=None):
    """The row of one engine step; `variant` is a (case suffix, options) of VARIANTS."""
    name, classes, channels, size, ipc, batch_real = case
    suffix, options = variant or (None, {})
    method_class, bench, _ = METHODS[method_name]
    data, sampler, generator, init, init_labels = _setup(classes, channels, size, ipc, batch_real, device, images_on)
    synset = SyntheticSet.from_tensors(init.clone(), init_labels, num_classes=classes, mean=data.mean, std=data.std)
    method = method_class("standin", ipc, batch_real=batch_real, **options)
    method.init(synset, data, sampler, generator, device)
    counter = iter(range(10**9))
    step = lambda: method.step(synset, next(counter))  # noqa: E731
    ms, memory, failure = common.measure(step, device, **timing)
    note = STAND_IN
    if images_on == "host":
        name, note = f"{name}-streamed", f"{STAND_IN}, streamed from the host"
    if suffix:
        settings = ", ".join(f"{key}={value}" for key, value in options.items())
        name, note = f"{name}-{suffix}", f"{STAND_IN}; {method_name} with {settings}"
    return common.row(bench, name, "ours", ms, peak_mem_mb=memory, peaks=peaks, note=failure or note)


def measure_eager(case, method_name, device, peaks, timing: dict, compiled: bool):
    name, classes, channels, size, ipc, batch_real = case
    _, bench, kernel = METHODS[method_name]
    data, sampler, generator, init, _ = _setup(classes, channels, size, ipc, batch_real, device)
    real_by_class = [data.normalized(torch.nonzero(data.labels == c).flatten()).to(device) for c in range(classes)]
    syn = init.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
    counter = iter(range(10**9))
    options = dict(ipc=ipc, batch_real=batch_real, strategy="color_crop_cutout_flip_scale_rotate",
                   channel=channels, im_size=(size, size), kernel=kernel)
    if compiled:
        import bench.baselines.dm_per_class as baseline

        original = baseline.ConvNet
        # One compiled function for all the fresh nets: each net is an argument (Dynamo inlines
        # its parameters as inputs), so a new net per iteration does not recompile.
        embed = common.compiled(lambda net, x: original.embed(net, x), dynamic=False)

        def compiled_convnet(*args, **kwargs):
            net = original(*args, **kwargs)
            net.embed = functools.partial(embed, net)
            return net

        baseline.ConvNet = compiled_convnet
    try:
        step = lambda: dm_iteration_per_class(real_by_class, syn, optimizer, seed=next(counter), **options)  # noqa: E731
        ms, memory, failure = common.measure(step, device, **timing)
    finally:
        if compiled:
            baseline.ConvNet = original
    return common.row(bench, name, "compile" if compiled else "eager", ms, peak_mem_mb=memory,
                      peaks=peaks, note=failure or STAND_IN)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("dm", "m3d", "both"), default="both",
                        help="which method's iteration to time (default both)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--out", help="results file (default bench/results/dm_iteration.json, "
                                      "m3d_iteration.json with --method m3d, ..._quick.json with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peaks = common.device_peaks(device)
    methods = ("dm", "m3d") if args.method == "both" else (args.method,)
    timing = QUICK_TIMING if args.quick else FULL_TIMING
    name = "m3d_iteration" if args.method == "m3d" else "dm_iteration"
    name = f"{name}_quick" if args.quick else name
    rows = common.Rows(name, device, args.out)
    for method_name in methods:
        for case in QUICK_CASES if args.quick else FULL_CASES:
            rows.append(measure_ours(case, method_name, device, peaks, timing))
            rows.append(measure_eager(case, method_name, device, peaks, timing, compiled=False))
            if args.no_compile or device.type == "cpu":
                rows.append(common.row(METHODS[method_name][1], case[0], "compile", None,
                                       note="skipped (CPU or --no-compile)"))
            else:
                rows.append(measure_eager(case, method_name, device, peaks, timing, compiled=True))
            print(rows[-3:], flush=True)
            for variant in VARIANTS.get(method_name, ()):
                rows.append(measure_ours(case, method_name, device, peaks, timing, variant=variant))
                print(rows[-1], flush=True)
            if method_name == "dm" and case[0] in STREAMED_CASES:
                rows.append(measure_ours(case, method_name, device, peaks, timing, images_on="host"))
                print(rows[-1], flush=True)
    common.finish(name, rows, device, args.out)
    return rows


if __name__ == "__main__":
    main()
