"""`condense bench`: run the kernel benchmark suite of a source checkout (bench/run_all.py).

The benchmarks live in the repository's bench/ folder, not in the installed package, so the
command looks for a checkout in the current directory and then in the folder holding the
installed package (an editable install of a checkout), and says so plainly when there is none.
"""
import os
import sys

import condense_engine

def candidate_roots() -> list[str]:
    """Where a checkout may be: the current directory, then the package's parent folder."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(condense_engine.__file__)))
    return [os.getcwd(), package_parent]


def find_checkout(roots: list[str]) -> str | None:
    """The first of `roots` holding bench/run_all.py, or None."""
    for root in roots:
        if os.path.isfile(os.path.join(root, "bench", "run_all.py")):
            return os.path.abspath(root)
    return None


def add_bench_command(subparsers) -> None:
    """Register `condense bench` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "bench", help="run the kernel benchmarks of a source checkout and regenerate bench/RESULTS.md",
        description="Run every kernel benchmark (ours vs eager vs torch.compile), print one table and "
        "regenerate bench/RESULTS.md. Needs a source checkout: run it from the repository root.")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these benchmarks (mmd, dsa, embed, trajectory, dm_iteration, condense_time, evaluate)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate bench/RESULTS.md")


def run_bench_command(args) -> int:
    """Run bench.run_all from the checkout found; exit status 2 when there is none."""
    roots = candidate_roots()
    checkout = find_checkout(roots)
    if checkout is None:
        print("condense bench needs a source checkout of condense-engine (its bench/ folder is not "
              "part of the installed package); none found in " + " or ".join(roots) +
              ". Run it from the repository root.", file=sys.stderr)
        return 2
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    from bench import run_all

    argv = (["--quick"] if args.quick else []) + (["--only", *args.only] if args.only else [])
    return run_all.main(argv + (["--no-report"] if args.no_report else []))
