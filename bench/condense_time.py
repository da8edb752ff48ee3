"""Wall time to condense a data set with `ce.distill`, end to end (the issue's time targets).

    python -m bench.condense_time [--iterations N] [--measure-iterations K] [--data-root DIR]
                                  [--quick] [--out PATH]

Cases, DM at IPC 50 with batch_real 256 and the whole train set resident on the device, in fp32
and with bf16 embeddings (precision="bf16", the loss in fp32):
CIFAR-10 (50 000 × 3×32×32, target ≤ 60 s for 20 000 iterations on one H100) and TinyImageNet
(100 000 × 3×64×64, target ≤ 20 min). The real train set is read from <data-root>/<name> when
that folder exists, else a random uint8 stand-in of the same shape is used; the row's note says
which. Timed: `ce.distill` with the driver included (initial set, sampler, loop, host syncs)
and no evaluation, checkpoint, log or progress bar, after an untimed warm-up `ce.distill` of a
few iterations (cuDNN and Triton autotuning, allocator), with the device synchronised around it.

By default all N iterations run. `--measure-iterations K` runs K and extrapolates: setup (the
measured time minus the loop's own, `synset.meta["seconds"]`) plus the loop time × N / K.
`--measure-seconds S` picks K per case instead: as many iterations as the warm-up's pace fits in
S seconds (at least MIN_MEASURED, at most N), so a short device lease times a TinyImageNet
iteration (≈ 40 ms at the bf16 FLOP floor) and a CIFAR-10 one (a few ms) for about as long.
Each row carries `iterations_run`, `iterations_target`, `seconds_measured`,
`seconds_extrapolated` (= seconds_measured when K = N), `setup_seconds` and `target_seconds`
(the issue's, for N = 20 000 only);
its `ms` is the loop's milliseconds per iteration. `--quick`: tiny shapes, a few iterations, CPU.
"""
import argparse
import os
import time

import torch

import condense_engine as ce
from bench import common
from bench.accuracy import DEFAULT_DATA_ROOT

BENCH = "condense_time"
ISSUE_ITERATIONS = 20000
# name, data set, classes, images per class, channels, size, ipc, batch_real, target seconds, DM options
FULL_CASES = [
    ("cifar10-ipc50-dm", "cifar10", 10, 5000, 3, 32, 50, 256, 60.0, {}),
    ("cifar10-ipc50-dm-bf16", "cifar10", 10, 5000, 3, 32, 50, 256, 60.0, dict(precision="bf16")),
    ("tiny-ipc50-dm", "tinyimagenet", 200, 500, 3, 64, 50, 256, 20 * 60.0, {}),
    ("tiny-ipc50-dm-bf16", "tinyimagenet", 200, 500, 3, 64, 50, 256, 20 * 60.0, dict(precision="bf16")),
]
QUICK_CASES = [("quick-ipc2-dm", "quick", 3, 12, 3, 16, 2, 8, None, {})]
FULL_WARMUP_ITERATIONS, QUICK_WARMUP_ITERATIONS = 20, 1
MIN_MEASURED = 3  # fewest timed iterations --measure-seconds picks
QUICK_ITERATIONS = 4


def train_set(name: str, classes: int, per_class: int, channels: int, size: int,
              data_root: str | None) -> tuple:
    """(train set, note): the real one under data_root/name when that folder exists, else a
    random uint8 stand-in of the real shape named like the real set (same method defaults)."""
    root = os.path.join(data_root, name) if data_root else None
    if root and os.path.isdir(root):
        return ce.datasets.load(name, root=root, split="train"), f"real {name} train set from {root}"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, channels, size, size), dtype=torch.uint8,
                           generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    stand_in = ce.datasets.from_tensors(images, labels, name=name)
    return stand_in, f"random uint8 stand-in of {len(images)}×{channels}×{size}×{size}"


def timed_run(fn, device: torch.device, warmup=None) -> tuple:
    """(seconds, peak device MB above what was allocated before, result, None) of one call of
    `fn(warm)` after an untimed `warm = warmup()` (None without one), the device synchronised
    around the timed call; the peak is None off CUDA. Like common.measure, an exception (out of
    memory included) gives (None, None, None, "failed: ...") so one failing case does not end
    the whole run."""
    cuda = device.type == "cuda"
    try:
        warm = warmup() if warmup is not None else None
        if cuda:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = fn(warm)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001: any failure becomes the row's note
        if cuda:
            torch.cuda.empty_cache()
        return None, None, None, f"failed: {type(error).__name__}: {str(error)[:120]}"
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else None
    return seconds, peak, result, None


def iterations_within(seconds: float, warm_synset, iterations: int) -> int:
    """How many iterations at the warm-up's pace (its loop seconds over its iterations) fit in
    `seconds`, within [MIN_MEASURED, iterations]."""
    pace = warm_synset.meta["seconds"] / warm_synset.meta["iterations"]
    return max(MIN_MEASURED, min(iterations, int(seconds / max(pace, 1e-9))))


def measure_case(case, device: torch.device, iterations: int, measured: int | None, warmup: int,
                 data_root: str | None, measure_seconds: float | None = None) -> dict:
    """One row: `measured` timed iterations of DM on the case (or as many as fit in
    `measure_seconds`), extrapolated to `iterations`."""
    name, dataset, classes, per_class, channels, size, ipc, batch_real, target, options = case
    data, source = train_set(dataset, classes, per_class, channels, size, data_root)
    data = data.to(device)

    def condense(steps: int):
        return ce.distill(data, method="dm", ipc=ipc, iterations=steps, device=device, progress=False,
                          batch_real=batch_real, **options)

    def warm_up():
        first = condense(warmup)  # compiles, autotunes and fills the allocator
        return first if measure_seconds is None else condense(warmup)  # the pace of warm iterations

    def timed(warm_synset):
        return condense(measured if measure_seconds is None
                        else iterations_within(measure_seconds, warm_synset, iterations))

    seconds, peak, synset, failure = timed_run(timed, device, warm_up)
    if failure:
        return common.row(BENCH, name, "ours", None, note=failure)
    measured = synset.meta["iterations"]
    loop_seconds = synset.meta["seconds"]
    setup_seconds = max(seconds - loop_seconds, 0.0)
    extrapolated = seconds if measured == iterations else setup_seconds + loop_seconds * iterations / measured
    target = target if iterations == ISSUE_ITERATIONS else None
    how = ("all run" if measured == iterations
           else f"EXTRAPOLATED from {measured} run in {seconds:.3g} s, setup {setup_seconds:.3g} s")
    against = f", target {target:g} s" if target else ""
    result = common.row(BENCH, name, "ours", 1e3 * loop_seconds / measured, peak_mem_mb=peak,
                        note=f"{extrapolated:.4g} s for {iterations} iterations ({how}){against}; "
                             f"ms = per iteration; {source}; DM {options.get('precision', 'fp32')}")
    return dict(result, iterations_run=measured, iterations_target=iterations, seconds_measured=seconds,
                seconds_extrapolated=extrapolated, setup_seconds=setup_seconds, target_seconds=target)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, help=f"iterations to report the time of "
                        f"(default {ISSUE_ITERATIONS}; {QUICK_ITERATIONS} with --quick)")
    parser.add_argument("--measure-iterations", type=int,
                        help="iterations actually run, extrapolated to --iterations (default: all)")
    parser.add_argument("--measure-seconds", type=float,
                        help="per case, run as many iterations as the warm-up's pace fits in this "
                             "many seconds and extrapolate (instead of --measure-iterations)")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                        help="folder holding cifar10/ and tinyimagenet/ (a stand-in is used when absent)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few iterations, CPU (smoke test)")
    parser.add_argument("--out", help="results file (default bench/results/condense_time.json, "
                                      "condense_time_quick.json with --quick)")
    args = parser.parse_args(argv)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else ISSUE_ITERATIONS)
    measured = args.measure_iterations or iterations
    if not 1 <= measured <= iterations:
        parser.error(f"--measure-iterations must lie in [1, {iterations}], got {measured}")
    if args.measure_seconds is not None and (args.measure_iterations or not args.measure_seconds > 0):
        parser.error("--measure-seconds takes a positive number of seconds, without --measure-iterations")
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    warmup = QUICK_WARMUP_ITERATIONS if args.quick else FULL_WARMUP_ITERATIONS
    rows = common.Rows(f"{BENCH}_quick" if args.quick else BENCH, device, args.out)
    for case in QUICK_CASES if args.quick else FULL_CASES:
        rows.append(measure_case(case, device, iterations, measured, warmup, None if args.quick else args.data_root,
                                 args.measure_seconds))
        print(rows[-1], flush=True)
    common.finish(f"{BENCH}_quick" if args.quick else BENCH, rows, device, args.out)
    return rows


if __name__ == "__main__":
    main()
