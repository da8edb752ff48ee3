"""Run every benchmark (kernels, DM/M3D iterations, condensation and evaluation wall time), print
one table of all rows, and regenerate bench/RESULTS.md.

    python -m bench [--quick] [--only mmd dsa ...] [--results-dir DIR] [--report PATH] [--no-report]

Each benchmark module's `main(argv)` runs with `--out <results-dir>/<name>.json`, or
`<name>_quick.json` with --quick (CPU smoke runs, which RESULTS.md never shows). A benchmark
whose module does not exist yet is skipped with a message; one that fails is reported and makes
the exit status 1, after the others have run.
"""
import argparse
import importlib
import inspect
import json
import os
import sys
import traceback

from bench import common, report

BENCHMARKS = ("mmd", "dsa", "embed", "match_dist", "moments", "trajectory", "dm_iteration", "condense_time", "evaluate")


def results_path(name: str, quick: bool, results_dir: str) -> str:
    """Where a benchmark's rows go: <results_dir>/<name>.json, or <name>_quick.json."""
    return os.path.join(results_dir, f"{name}_quick.json" if quick else f"{name}.json")


def call_main(main, argv: list[str]) -> None:
    """Call a benchmark's `main` with `argv`; a `main()` that takes no arguments reads sys.argv,
    so it gets them there."""
    if inspect.signature(main).parameters:
        main(argv)
        return
    saved = sys.argv
    sys.argv = [main.__module__] + argv
    try:
        main()
    finally:
        sys.argv = saved


def run_benchmark(name: str, quick: bool, results_dir: str) -> list[dict] | None:
    """Run bench.<name> and return the rows of the file it wrote; None when the module is missing."""
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"bench.{name}":
            raise
        print(f"skipped {name}: bench/{name}.py does not exist yet", flush=True)
        return None
    path = results_path(name, quick, results_dir)
    call_main(module.main, (["--quick"] if quick else []) + ["--out", path])
    with open(path) as f:
        return json.load(f)["rows"]


def run_benchmarks(names, quick: bool, results_dir: str) -> tuple[list[dict], list[str], list[str]]:
    """Run the named benchmarks in turn: (all rows, names skipped, names that failed)."""
    rows, skipped, failed = [], [], []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        try:
            result = run_benchmark(name, quick, results_dir)
        except (Exception, SystemExit):  # a benchmark's argparse exits on bad arguments
            traceback.print_exc()
            failed.append(name)
            continue
        if result is None:
            skipped.append(name)
        else:
            rows += result
    return rows, skipped, failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only these benchmarks ({', '.join(BENCHMARKS)})")
    parser.add_argument("--results-dir", default=common.RESULTS_DIR, help="folder of results JSON files")
    parser.add_argument("--report", default=report.REPORT_PATH, help="RESULTS.md to regenerate")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate RESULTS.md")
    args = parser.parse_args(argv)

    rows, skipped, failed = run_benchmarks(args.only or BENCHMARKS, args.quick, args.results_dir)
    print("\n=== all benchmarks ===")
    common.print_table([dict(row, case=f"{row['bench']}/{row['case']}") for row in rows])
    if skipped:
        print(f"skipped (module missing): {', '.join(skipped)}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    if not args.no_report:
        print(f"wrote {report.write_report(args.results_dir, args.report)}")
    return 1 if failed else 0
