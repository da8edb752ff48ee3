"""The `condense` command: distil, evaluate, look at and manage data sets from the shell.

    condense datasets list
    condense distill --dataset default --method dm --ipc 10 --out out/dm --evaluate --baseline
    condense evaluate out/dm/synset.pt --dataset mnist --root data/mnist --repeats 5
    condense show out/dm/synset.pt --out grid.png
    condense experts --dataset mnist --root data/mnist --num-experts 10 --out runs/experts
"""
import argparse
import ast
import json
import os
import sys
import time
import traceback

from condense_engine.bench_cli import add_bench_command, run_bench_command
from condense_engine.datasets.rows import PLACEMENTS
from condense_engine.errors import MissingPackageError
from condense_engine.expert import add_experts_command, run_experts_command


def parse_option(text: str):
    """Parse KEY=VALUE; VALUE as a Python literal when it is one (1, 0.5, True, "x"), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_eval_args(parser, *, epochs: int, repeats: int) -> None:
    group = parser.add_argument_group("evaluation (SPEC §6: fresh nets, SGD momentum 0.9, DSA)")
    group.add_argument("--model", action="append", default=None,
                       help="evaluation architecture; repeat for cross-architecture (default ConvNet; under "
                            "--recipe dd, the student the set's steps were learned for)")
    group.add_argument("--repeats", type=int, default=repeats, help=f"fresh models per architecture ({repeats})")
    group.add_argument("--epochs", type=int, default=epochs, help=f"training epochs per model ({epochs})")
    group.add_argument("--eval-lr", type=float, default=None, help="lr (default: the set's learned lr, else 0.01)")
    group.add_argument("--eval-batch", type=int, default=None, help="training batch size (the recipe's: 256, IDC 64)")
    group.add_argument("--recipe", choices=("dc", "idc", "dd"), default="dc",
                       help="dc: the standard protocol; idc: IDC's (batch 64, multistep lr, CutMix); dd: replay "
                            "a DD set's learned step sizes (--epochs and --no-dsa do not apply)")
    group.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    group.add_argument("--dc-augment", metavar="STRATEGY", default=None,
                       help="train with DC's own augmentation instead of DSA, e.g. crop_scale_rotate (how DC "
                            "evaluated MNIST); ops: crop, scale, rotate, noise")
    group.add_argument("--baseline", action="store_true",
                       help="also train on random real images of the same IPC (needs the train split)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="condense", description="Dataset condensation: squeeze a training set into a few synthetic "
        "images per class that train a network almost as well.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="condense a data set into a synthetic set",
                       description="Condense a data set. Writes synset.pt, grid.png, log.jsonl and "
                       "checkpoint.pt into --out (and report.json with --evaluate).")
    p.add_argument("--dataset", default="default", help="data set name (see `condense datasets list`)")
    p.add_argument("--root", default=None, help="folder (or file) holding the data set's files")
    p.add_argument("--method", default="dm", help="condensation method (dm, ...)")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class (10)")
    p.add_argument("--iterations", type=int, default=None, help="distillation iterations (method default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="options", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --set lr_img=1.0 --set batch_real=256")
    p.add_argument("--out", default="out/distill", help="output folder (out/distill)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints (500)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0,
                   help="also write a checkpoint once this many minutes have passed since the last (10; 0: off)")
    p.add_argument("--sync-every", type=int, default=None,
                   help="iterations between reading the loss back from the device (1 on CPU, 10 on a GPU)")
    p.add_argument("--real-images-on", choices=PLACEMENTS, default="device",
                   help="where the real images stay: on the device (default, fastest) or on the host, "
                        "moving each batch (for a set larger than the device's memory)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt; with a larger --iterations, "
                   "extend that run to the longer schedule (on the CPU, bit for bit the longer run)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N iterations (0: never)")
    p.add_argument("--evaluate", action="store_true",
                   help="evaluate the result and write report.json (finished runs are kept in "
                        "evaluation-runs.pt, so a stopped evaluation continues with --resume)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to <out>/tensorboard for TensorBoard (needs the tensorboard package)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_eval_args(p, epochs=1000, repeats=5)

    p = sub.add_parser("evaluate", help="train fresh networks on a saved synthetic set and test them")
    p.add_argument("synset", help="a synthetic set saved by `condense distill` (synset.pt)")
    p.add_argument("--dataset", default=None, help="data set of the test split (default: the set's own)")
    p.add_argument("--root", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--fair", action="store_true",
                   help="also DD-Ranking's label- and augmentation-robust scores (LRS, ARS; needs the train split)")
    p.add_argument("--full-accuracy", type=float, default=None,
                   help="--fair: full-data accuracy as a fraction (default: measured, see --full-epochs)")
    p.add_argument("--full-epochs", type=int, default=30, help="--fair: epochs of the full-data run (30)")
    p.add_argument("--checkpoint", default=None,
                   help="file keeping each finished evaluation run: the same command run again trains only the "
                        "runs it had not finished")
    _add_eval_args(p, epochs=1000, repeats=5)

    add_experts_command(sub)
    add_bench_command(sub)

    p = sub.add_parser("show", help="write a PNG grid of a saved synthetic set (one row per class)")
    p.add_argument("synset")
    p.add_argument("--out", default=None, help="PNG path (default: next to the set, .png)")

    p = sub.add_parser("datasets", help="list the supported data sets or verify files")
    dsub = p.add_subparsers(dest="action", required=True)
    dsub.add_parser("list", help="list the data set names")
    v = dsub.add_parser("verify", help="check a data set's files (layout, and md5 where known)")
    v.add_argument("name")
    v.add_argument("--root", default=None)
    return parser


def _load(name: str, root, split: str):
    from condense_engine import datasets

    return datasets.load(name, root=root, split=split)


def _evaluate(args, synset, test_set, train_set, device=None, checkpoint=None):
    """Evaluate with every --model; `checkpoint` keeps finished runs (see ce.evaluate)."""
    from condense_engine.evaluate import evaluate

    reports = []
    for model in args.model or [None]:
        report = evaluate(synset, test_set, model=model, repeats=args.repeats, epochs=args.epochs,
                          lr=args.eval_lr, batch_size=args.eval_batch, dsa=not (args.no_dsa or args.dc_augment),
                          seed=args.seed, baseline=args.baseline, train_set=train_set, device=device or args.device,
                          recipe=args.recipe, checkpoint=checkpoint, dc_augment=args.dc_augment)
        print(report, flush=True)
        reports.append(report)
    return reports


def _report_json(reports, extra: dict) -> dict:
    first = reports[0]
    out = dict(extra, accuracy_mean=first.mean, accuracy_std=first.std,
               evaluations=[r.to_dict() for r in reports])
    if first.baseline is not None:
        out.update(random_baseline_mean=first.baseline.mean, random_baseline_std=first.baseline.std)
    return out


def cmd_distill(args) -> int:
    from condense_engine import distributed

    if not distributed.launched_by_torchrun():
        return _distill(args, args.device, lead=True)
    device = distributed.init_from_env(args.device)  # class-sharded: rank 0 writes and evaluates
    return distributed.run_ranked(lambda: _distill(args, device, lead=distributed.rank() == 0))


def _distill(args, device, lead: bool) -> int:
    import condense_engine as ce

    began = time.perf_counter()
    train = _load(args.dataset, args.root, "train")
    test = _load(args.dataset, args.root, "test") if (args.evaluate or args.eval_every) else None
    os.makedirs(args.out, exist_ok=True)
    eval_options = dict(repeats=args.repeats, epochs=args.epochs, model=(args.model or [None])[0],
                        recipe=args.recipe)
    synset = ce.distill(train, method=args.method, ipc=args.ipc, iterations=args.iterations, device=device,
                        seed=args.seed, test_set=test, eval_every=args.eval_every, eval_options=eval_options,
                        checkpoint=os.path.join(args.out, "checkpoint.pt"), checkpoint_every=args.checkpoint_every,
                        checkpoint_minutes=args.checkpoint_minutes or None,
                        sync_every=args.sync_every, real_images_on=args.real_images_on,
                        resume=args.resume, log=os.path.join(args.out, "log.jsonl"),
                        tensorboard=os.path.join(args.out, "tensorboard") if args.tensorboard else None,
                        progress=not args.quiet,
                        **dict(args.options))
    distill_seconds = time.perf_counter() - began
    if not lead:
        return 0
    synset.save(os.path.join(args.out, "synset.pt"))
    grid = synset.save_grid(os.path.join(args.out, "grid.png"))
    print(f"synthetic set: {os.path.join(args.out, 'synset.pt')}  grid: {grid}", flush=True)
    if args.evaluate:
        reports = _evaluate(args, synset, test, train, device, os.path.join(args.out, "evaluation-runs.pt"))
        schedule = dict(method=args.method, ipc=args.ipc, iterations=synset.meta["iterations"],
                        options=synset.meta["options"], evaluation=reports[0].recipe)
        report = _report_json(reports, dict(dataset=train.name, seconds=round(time.perf_counter() - began, 1),
                                            distill_seconds=round(distill_seconds, 1), schedule=schedule))
        path = os.path.join(args.out, "report.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        line = f"accuracy {100 * report['accuracy_mean']:.2f} ± {100 * report['accuracy_std']:.2f} %"
        if "random_baseline_mean" in report:
            line += f"  (random real baseline {100 * report['random_baseline_mean']:.2f} %)"
        print(f"{line}  in {report['seconds']:.0f} s; report: {path}", flush=True)
    return 0


def cmd_evaluate(args) -> int:
    from condense_engine.synset import SyntheticSet

    synset = SyntheticSet.load(args.synset)
    name = args.dataset or synset.meta.get("dataset")
    if not name:
        raise ValueError("the set does not name its data set; pass --dataset")
    test = _load(name, args.root, "test")
    args.baseline = args.baseline or args.fair  # the fair scores need it: evaluated once, then reused
    train = _load(name, args.root, "train") if args.baseline else None
    reports = _evaluate(args, synset, test, train, checkpoint=args.checkpoint)
    extra = dict(dataset=name, synset=args.synset)
    if args.fair:
        from condense_engine.fair import fair_scores

        fair = fair_scores(synset, test, train, full_accuracy=args.full_accuracy, full_epochs=args.full_epochs,
                           model=(args.model or ["ConvNet"])[0], repeats=args.repeats, epochs=args.epochs,
                           lr=args.eval_lr, batch_size=args.eval_batch, seed=args.seed, device=args.device,
                           recipe=args.recipe, checkpoint=args.checkpoint,
                           report=None if args.no_dsa or args.dc_augment else reports[0])
        print(fair, flush=True)
        extra["fair"] = fair.to_dict()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(_report_json(reports, extra), f, indent=2)
    return 0


def cmd_show(args) -> int:
    from condense_engine.synset import SyntheticSet

    synset = SyntheticSet.load(args.synset)
    out = args.out or os.path.splitext(args.synset)[0] + ".png"
    print(synset.save_grid(out))
    return 0


def cmd_datasets(args) -> int:
    from condense_engine import datasets

    if args.action == "list":
        for name, description in datasets.list_datasets().items():
            print(f"{name:14s} {description}")
        return 0
    report = datasets.verify(args.name, args.root)
    print(json.dumps(report, indent=2, default=str))
    return 0 if report.get("ok", True) else 1


COMMANDS = {"distill": cmd_distill, "evaluate": cmd_evaluate, "show": cmd_show, "datasets": cmd_datasets,
            "experts": run_experts_command, "bench": run_bench_command}


def main(argv=None) -> int:
    """Run one command; its exit status. A rank of a torchrun launch exits here instead of
    returning (see distributed.exit_rank), also after an unexpected error, whose traceback it
    prints first (status 1, as Python's own exit would give)."""
    from condense_engine import distributed

    args = build_parser().parse_args(argv)
    if not distributed.launched_by_torchrun():
        return _run(args)
    try:
        code = _run(args)
    except Exception:
        traceback.print_exc()
        code = 1
    distributed.exit_rank(code)


def _run(args) -> int:
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, MissingPackageError, ValueError) as err:
        print(f"condense {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"condense {args.command}: interrupted: {err}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
