"""Speed of the evaluation protocol: `ce.evaluate` with the repeats trained together vs in turn.

    python -m bench.evaluate [--epochs E] [--quick] [--out PATH]

One full evaluation = R = 5 fresh ConvNets trained for 1000 epochs on a synthetic set (SGD,
DSA on every batch, lr decay at half) and tested on the test set, as `ce.evaluate` runs it.
Cases: CIFAR-10 shapes, synthetic sets of IPC 10 and 50 (random images) and a random uint8
stand-in test set of 10 000 × 3×32×32 (the accuracy is meaningless, the time is not).
"ours" is `ce.evaluate(batched=True)`: the R repeats as one vmapped model
(condense_engine/evaluate_batched.py, what accelerators run by default); "eager" is
`ce.evaluate(batched=False)`: the repeats one after another (the published loop). Each is timed
once after an untimed one-epoch warm-up evaluation, the device synchronised around it; `ms` is
the time of the whole evaluation. `--quick`: tiny shapes, 2 epochs, CPU.
"""
import argparse

import torch

import condense_engine as ce
from bench import common
from bench.condense_time import timed_run

BENCH = "evaluate"
REPEATS = 5
FULL_EPOCHS, QUICK_EPOCHS = 1000, 2
FULL_CASES = [  # name, classes, channels, size, ipc, test images per class
    ("cifar10-ipc10", 10, 3, 32, 10, 1000),
    ("cifar10-ipc50", 10, 3, 32, 50, 1000),
]
QUICK_CASES = [("quick-ipc2", 4, 3, 16, 2, 10)]
#: impl → (ce.evaluate's `batched`, the path its report must name, what the row's note says).
PATHS = {"ours": (True, "batched", "repeats trained together (vmap)"),
         "eager": (False, "loop", "repeats trained one after another")}


def stand_in_sets(classes: int, channels: int, size: int, ipc: int, test_per_class: int) -> tuple:
    """(synthetic set of random images, uint8 stand-in test set named cifar10)."""
    generator = torch.Generator().manual_seed(0)
    test_images = torch.randint(0, 256, (classes * test_per_class, channels, size, size), dtype=torch.uint8,
                                generator=generator)
    test_set = ce.datasets.from_tensors(test_images, torch.arange(classes).repeat_interleave(test_per_class),
                                        name="cifar10", split="test")
    synset = ce.SyntheticSet.from_tensors(torch.randn(classes * ipc, channels, size, size, generator=generator),
                                          torch.arange(classes).repeat_interleave(ipc), num_classes=classes,
                                          mean=test_set.mean, std=test_set.std)
    return synset, test_set


def measure(case, impl: str, epochs: int, device: torch.device) -> dict:
    """One row: the wall time of one `ce.evaluate` of the case along `impl`'s path."""
    name, classes, channels, size, ipc, test_per_class = case
    synset, test_set = stand_in_sets(classes, channels, size, ipc, test_per_class)
    batched, path, what = PATHS[impl]

    def evaluate(epochs_run: int):
        return ce.evaluate(synset, test_set, repeats=REPEATS, epochs=epochs_run, batched=batched, device=device)

    seconds, peak, report, failure = timed_run(lambda _: evaluate(epochs), device, lambda: evaluate(1))
    if failure:
        return common.row(BENCH, name, impl, None, note=failure)
    if report.recipe["path"] != path:
        raise RuntimeError(f"batched={batched} ran the {report.recipe['path']} path, not the {path} one")
    note = f"{REPEATS} {what}, {epochs} epochs; random stand-in images"
    return common.row(BENCH, name, impl, 1e3 * seconds, peak_mem_mb=peak, note=note)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, help=f"training epochs (default {FULL_EPOCHS}; "
                                                   f"{QUICK_EPOCHS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 epochs, CPU (smoke test)")
    parser.add_argument("--out", help="results file (default bench/results/evaluate.json, "
                                      "evaluate_quick.json with --quick)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else FULL_EPOCHS)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    rows = common.Rows(f"{BENCH}_quick" if args.quick else BENCH, device, args.out)
    for case in QUICK_CASES if args.quick else FULL_CASES:
        for impl in PATHS:
            rows.append(measure(case, impl, epochs, device))
            print(rows[-1], flush=True)
    common.finish(f"{BENCH}_quick" if args.quick else BENCH, rows, device, args.out)
    return rows


if __name__ == "__main__":
    main()
