"""Helpers shared by every benchmark: timing, peak memory, device peaks, result rows and files.

A result row is `{"bench", "case", "impl" ("ours" | "eager" | "compile"), "ms", "tflops", "gbps",
"peak_mem_mb", "pct_of_peak"}` plus an optional "note"; a results file is
`bench/results/<name>.json` = `{"device", "torch", "triton", "cuda", "date", "rows": [...]}`.
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time

import torch

if not torch.cuda.is_available():
    # Every kernel benchmark imports this module before condense_engine.kernels, and Triton must
    # see TRITON_INTERPRET before it decorates a kernel: CPU smoke runs use the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: The note on a Triton row measured in the CPU interpreter.
INTERPRETER_NOTE = "Triton interpreter (TRITON_INTERPRET=1): a smoke test, not a speed"

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Dense peak throughput per device, from NVIDIA's H100 and H200 datasheets (SXM form factor
# unless named; the sparsity-doubled figures are not used): TFLOP/s for bf16 and TF32 tensor
# cores and for fp32 on CUDA cores, and HBM bandwidth in GB/s.
DEVICE_PEAKS = {
    "H200": dict(bf16_tflops=989.0, tf32_tflops=494.0, fp32_tflops=67.0, hbm_gbps=4800.0),
    "H100 PCIe": dict(bf16_tflops=756.0, tf32_tflops=378.0, fp32_tflops=51.0, hbm_gbps=2000.0),
    "H100 NVL": dict(bf16_tflops=835.0, tf32_tflops=418.0, fp32_tflops=60.0, hbm_gbps=3900.0),
    "H100": dict(bf16_tflops=989.0, tf32_tflops=494.0, fp32_tflops=67.0, hbm_gbps=3350.0),
}


def device_name(device: torch.device | str) -> str:
    """Human-readable name of the device the benchmark runs on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_peaks(device: torch.device | str) -> dict | None:
    """The peak numbers of a known GPU, matched on its name (H200, H100 PCIe/NVL, H100 SXM)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DEVICE_PEAKS.items():
        if all(word in name for word in key.split()):
            return peaks
    return None


def compute_peak_tflops(peaks: dict, dtype: torch.dtype) -> float:
    """The compute roof for inputs of `dtype`: bf16/fp16 → bf16 tensor cores, fp32 → TF32
    tensor cores (the fastest path fp32 data can take)."""
    return peaks["tf32_tflops"] if dtype == torch.float32 else peaks["bf16_tflops"]


def time_ms(fn, device: torch.device | str, *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of `fn()` in milliseconds.

    CUDA: triton.testing.do_bench (warm-up, cache flush between runs, CUDA-event timing, median).
    CPU: median of `reps` perf_counter runs after `warmup` untimed ones.
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn, device: torch.device | str) -> float | None:
    """Peak CUDA memory allocated while `fn()` runs, above what was allocated before it (MB):
    the call's workspace, excluding its inputs. None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def row(bench: str, case: str, impl: str, ms: float | None, *, flops: float | None = None,
        bytes_moved: float | None = None, peak_mem_mb: float | None = None,
        peaks: dict | None = None, dtype: torch.dtype = torch.float32,
        note: str | None = None) -> dict:
    """One result row. tflops and gbps come from the case's FLOP and byte counts and `ms`;
    pct_of_peak is the share of the binding roof: max(TFLOP/s ÷ compute peak, GB/s ÷ HBM peak),
    None when the device's peaks are unknown."""
    if impl not in ("ours", "eager", "compile"):
        raise ValueError(f"impl must be ours, eager or compile, got {impl!r}")
    tflops = flops / (ms * 1e9) if flops is not None and ms else None
    gbps = bytes_moved / (ms * 1e6) if bytes_moved is not None and ms else None
    pct = None
    if peaks is not None and ms:
        shares = []
        if tflops is not None:
            shares.append(tflops / compute_peak_tflops(peaks, dtype))
        if gbps is not None:
            shares.append(gbps / peaks["hbm_gbps"])
        pct = 100.0 * max(shares) if shares else None
    result = dict(bench=bench, case=case, impl=impl, ms=ms, tflops=tflops, gbps=gbps,
                  peak_mem_mb=peak_mem_mb, pct_of_peak=pct)
    if note:
        result["note"] = note
    return result


def environment(device: torch.device | str) -> dict:
    """The header of a results file: device, library versions and the date (UTC)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def results_file(name: str, out: str | None = None) -> str:
    """Where a bench's rows go: `out`, or bench/results/<name>.json."""
    return out or os.path.join(RESULTS_DIR, f"{name}.json")


def write_results(name: str, rows: list[dict], device: torch.device | str,
                  out: str | None = None) -> str:
    """Write `{environment..., "rows": rows}` to `out` or bench/results/<name>.json; its path."""
    path = results_file(name, out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump({**environment(device), "rows": list(rows)}, f, indent=1)
        f.write("\n")
    os.replace(partial, path)
    return path


class Rows(list):
    """Result rows written to their file (atomically) each time one is appended, so a bench cut
    off by a time limit, such as a lent GPU's per-call limit, keeps every case it finished."""

    def __init__(self, name: str, device: torch.device | str, out: str | None = None):
        super().__init__()
        self.name, self.device, self.out = name, device, out

    @property
    def path(self) -> str:
        return results_file(self.name, self.out)

    def append(self, result: dict) -> None:
        super().append(result)
        write_results(self.name, self, self.device, self.out)


def compile_skip_reason(no_compile: bool, device: torch.device, quick: bool) -> str | None:
    """Why a bench leaves out its torch.compile rows, or None when it times them."""
    if no_compile:
        return "--no-compile"
    if quick and device.type == "cpu":
        return "on CPU, compiling each shape takes longer than the smoke test's budget"
    return None


def kernel_parser(bench: str, doc: str) -> argparse.ArgumentParser:
    """The command line every kernel benchmark (mmd, moments, dsa, match_dist, embed) shares;
    `doc` is its module docstring, whose first paragraph describes it. Add the bench's own
    options to the result."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--out", help=f"results file (default bench/results/{bench}.json; {bench}_bf16.json with "
                                      f"--dtype bf16, {bench}_quick.json with --quick)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype of every implementation's inputs (and weights)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--cases", nargs="+", help="only these case names")
    return parser


@dataclasses.dataclass
class KernelRun:
    """One kernel benchmark's run: its device, dtype and rows, and how each row is measured."""
    bench: str
    device: torch.device
    dtype: torch.dtype
    compile_note: str | None  # why the compile rows are skipped, or None
    peaks: dict | None
    name: str  # the results file's name
    rows: Rows  # written to --out (rows.out) as they come
    only: list | None  # --cases

    def chosen(self, cases: list) -> list:
        """The cases (tuples named by their first entry) that --cases selects."""
        return [case for case in cases if self.only is None or case[0] in self.only]

    def timed_row(self, label: str, impl: str, build_step, *, note: str | None = None,
                  skip: str | None = None, interpreted: bool = False, timing: dict | None = None,
                  **counts) -> dict:
        """One result row of `impl` on `label`: the step that build_step() returns, timed, or,
        when the row is skipped (`skip`, or this run's compile_note for impl "compile"), no
        timing and no inputs built. The note joins `note` with why it was skipped, the
        interpreter's caveat (`interpreted`) or the failure that ended the step."""
        skip = skip or (self.compile_note if impl == "compile" else None)
        counts.update(peaks=self.peaks, dtype=self.dtype)
        if skip:
            return row(self.bench, label, impl, None, note=_joined(note, f"skipped: {skip}"), **counts)
        ms, memory, outcome = measure(build_step(), self.device, interpreted=interpreted, **(timing or {}))
        return row(self.bench, label, impl, ms, peak_mem_mb=memory, note=_joined(note, outcome), **counts)

    def record(self, result: dict, what: str | None = None) -> None:
        """Append a row (its file is rewritten) and print its time; `what` names the impl."""
        self.rows.append(result)
        print(f"{result['case']} {what or result['impl']}: {result['ms']} ms", flush=True)

    def finish(self) -> list[dict]:
        """Write the results file and print the table (see finish); the rows."""
        finish(self.name, self.rows, self.device, self.rows.out)
        return self.rows


def _joined(*notes: str | None) -> str | None:
    """The notes that are given, joined by "; ", or None."""
    return "; ".join(note for note in notes if note) or None


def kernel_run(bench: str, args: argparse.Namespace) -> KernelRun:
    """The device (CUDA when present), dtype, results file and rows of a kernel benchmark run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = f"{bench}_quick" if args.quick else (bench if args.dtype == "fp32" else f"{bench}_bf16")
    return KernelRun(bench=bench, device=device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                     compile_note=compile_skip_reason(args.no_compile, device, args.quick), peaks=device_peaks(device),
                     name=name, rows=Rows(name, device, args.out), only=args.cases)


def grad_step(fn, mode: str, inputs: tuple, wrt, upstream: torch.Tensor | None = None):
    """A no-argument callable running one timed step: fn(*inputs) without autograd for "fwd";
    for "fwd+bwd", also the gradient of its output with respect to `wrt`, given `upstream`
    (None for a scalar output)."""
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return fn(*inputs)
        return forward

    def forward_backward():
        return torch.autograd.grad(fn(*inputs), wrt, upstream)
    return forward_backward


def compiled(fn, **options):
    """torch.compile(fn) with Dynamo's caches cleared first. A bench compiles the same code
    object once per case; past Dynamo's recompile limit (8) it would silently run the rest
    eagerly and the "compile" rows would time eager code."""
    torch._dynamo.reset()
    return torch.compile(fn, **options)


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (missing numbers shown as '-')."""
    columns = ("case", "impl", "ms", "tflops", "gbps", "peak_mem_mb", "pct_of_peak", "note")

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    """Print the rows as a table."""
    print(format_table(rows), flush=True)


def measure(step, device: torch.device | str, *, interpreted: bool = False, **timing) -> tuple:
    """(ms, extra peak MB, note) of `step`: the note is INTERPRETER_NOTE when `interpreted`
    (a Triton row on CPU), else None; (None, None, "failed: ...") when `step` raises an
    exception (out of memory, a kernel's compile error or resource limit), so one failing case
    does not end the whole run."""
    try:
        step()
        note = INTERPRETER_NOTE if interpreted else None
        return time_ms(step, device, **timing), peak_memory_mb(step, device), note
    except Exception as error:  # noqa: BLE001: any failure becomes the row's note
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return None, None, f"failed: {type(error).__name__}: {str(error)[:120]}"


def finish(name: str, rows: list[dict], device: torch.device | str, out: str | None = None) -> str:
    """Write the results file, print the table and where it went; the file's path. Rows of
    several benches in one file (DM and M3D in dm_iteration.json) show their case as bench/case."""
    path = write_results(name, rows, device, out)
    if len({r["bench"] for r in rows}) > 1:
        rows = [dict(r, case=f"{r['bench']}/{r['case']}") for r in rows]
    print()
    print_table(rows)
    print(f"\nwrote {path}")
    return path
