"""Regenerate bench/RESULTS.md, and one PNG bar chart per kernel results file, from bench/results/.

    python -m bench.report [--results-dir DIR] [--out PATH]

RESULTS.md is for real GPU numbers: files ending in `_quick.json` (CPU smoke runs) are never read,
and full runs whose device is a CPU (the native CPU kernels) get a section of their own after
the GPU tables, without plots or roofline. Each kernel table puts ours next to
the eager and torch.compile baselines with the speed-up over each, and places ours on the
roofline (achieved TFLOP/s and GB/s, share of the binding peak, and which roof binds).
condense_time.json (seconds to condense, against the issue's targets) has a table of its own.
`accuracy-*.json` files (bench/accuracy.py) feed the accuracy section.
"""
import argparse
import glob
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

from bench import accuracy
from bench.common import DEVICE_PEAKS, RESULTS_DIR

REPORT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
IMPLS = ("ours", "eager", "compile")
IMPL_COLOURS = {"ours": (31, 119, 180), "eager": (255, 127, 14), "compile": (44, 160, 44)}


def is_quick(path: str) -> bool:
    """Whether a results file holds a --quick smoke run (never reported)."""
    return path.endswith("_quick.json")


def is_gpu(results: dict) -> bool:
    """Whether a results file was measured on a GPU (CPU device names start with 'cpu')."""
    return not str(results.get("device", "cpu")).startswith("cpu")


def load_results(results_dir: str) -> dict:
    """The non-quick results files of `results_dir`, sorted by name and split into
    {"kernel": [(stem, data)] measured on a GPU, "cpu": [(stem, data)] full runs on a CPU,
     "accuracy": [(stem, data)]}."""
    found = {"kernel": [], "cpu": [], "accuracy": []}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        if is_quick(path):
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        with open(path) as f:
            data = json.load(f)
        if stem.startswith("accuracy-"):
            found["accuracy"].append((stem, data))
        elif is_gpu(data):
            found["kernel"].append((stem, data))
        else:
            found["cpu"].append((stem, data))
    return found


def peaks_for_device(name: str) -> dict | None:
    """The datasheet peaks of a device from its name, matched like common.device_peaks."""
    for key, peaks in DEVICE_PEAKS.items():
        if all(word in name for word in key.split()):
            return peaks
    return None


def speedup(baseline_ms: float | None, ours_ms: float | None) -> float | None:
    """How many times faster ours is than a baseline (baseline time ÷ our time)."""
    if not baseline_ms or not ours_ms:
        return None
    return baseline_ms / ours_ms


def binding_roof(row: dict, peaks: dict | None) -> str | None:
    """'memory' or 'compute': the roof that binds a row. pct_of_peak is the larger of the
    compute and bandwidth shares; the bandwidth share is the larger exactly when the row's
    FLOP per byte lies below the device's ridge point."""
    if peaks is None or row.get("pct_of_peak") is None or not row.get("tflops") or not row.get("gbps"):
        return None
    bandwidth_share = 100.0 * row["gbps"] / peaks["hbm_gbps"]
    return "memory" if bandwidth_share >= row["pct_of_peak"] * (1 - 1e-9) else "compute"


def cases(rows: list[dict]) -> list[tuple[str, dict]]:
    """The rows grouped by case, in first-seen order: [(case, {impl: row})]. In a file holding
    several benches (dm_iteration.json: DM and M3D rows) a case is named bench/case. An ablation
    row (impl "ours", note "ablation: ...") is a case of its own, "<case> (ablation)", so it
    neither replaces nor hides our real row."""
    several = len({row["bench"] for row in rows}) > 1
    grouped = {}
    for row in rows:
        case = f"{row['bench']}/{row['case']}" if several else row["case"]
        if (row.get("note") or "").startswith("ablation"):
            case += " (ablation)"
        grouped.setdefault(case, {})[row["impl"]] = row
    return list(grouped.items())


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _times(value) -> str:
    return "–" if value is None else f"{value:.3g}×"


def kernel_table(data: dict) -> str:
    """The markdown table of one results file: ms per implementation, speed-ups, roofline."""
    peaks = peaks_for_device(data["device"])
    lines = ["| case | ours ms | eager ms | compile ms | speed-up vs eager | speed-up vs compile "
             "| ours TFLOP/s | ours GB/s | % of peak | bound | peak MB (ours / eager / compile) "
             "| notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, by_impl in cases(data["rows"]):
        ms = {impl: by_impl.get(impl, {}).get("ms") for impl in IMPLS}
        ours = by_impl.get("ours", {})
        memory = " / ".join(_number(by_impl.get(impl, {}).get("peak_mem_mb")) for impl in IMPLS)
        notes = "; ".join(f"{impl}: {by_impl[impl]['note']}" for impl in IMPLS
                          if by_impl.get(impl, {}).get("note"))
        cells = [case, _number(ms["ours"]), _number(ms["eager"]), _number(ms["compile"]),
                 _times(speedup(ms["eager"], ms["ours"])), _times(speedup(ms["compile"], ms["ours"])),
                 _number(ours.get("tflops")), _number(ours.get("gbps")),
                 _number(ours.get("pct_of_peak"), 2), binding_roof(ours, peaks) or "–", memory,
                 notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def condense_time_table(data: dict) -> str:
    """The markdown table of condense_time.json: seconds to condense, measured or extrapolated,
    against the issue's target."""
    lines = ["| case | ms / iteration | iterations run / reported | seconds measured "
             "| seconds for the reported iterations | target s | within target | peak MB | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        seconds, target = row.get("seconds_extrapolated"), row.get("target_seconds")
        within = "–" if seconds is None or target is None else ("yes" if seconds <= target else "no")
        extrapolated = row.get("iterations_run") != row.get("iterations_target")
        cells = [row["case"], _number(row["ms"]),
                 f"{row.get('iterations_run', '–')} / {row.get('iterations_target', '–')}",
                 _number(row.get("seconds_measured")),
                 _number(seconds) + (" (extrapolated)" if extrapolated and seconds is not None else ""),
                 _number(target), within, _number(row.get("peak_mem_mb")), row.get("note") or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Results files whose rows are not kernel timings get their own table (default: kernel_table).
TABLES = {"condense_time": condense_time_table}


def environment_line(data: dict) -> str:
    """The header line of a results file: where and with what it was measured."""
    return (f"device **{data.get('device')}** · torch {data.get('torch')} · triton "
            f"{data.get('triton')} · CUDA {data.get('cuda')} · measured {data.get('date')}")


def plot_results(stem: str, data: dict, path: str) -> str:
    """Draw ms per case as horizontal bars, one per implementation, on a log axis; save a PNG."""
    grouped = cases(data["rows"])
    times = [row["ms"] for _, by_impl in grouped for row in by_impl.values() if row.get("ms")]
    low = 10 ** math.floor(math.log10(min(times))) if times else 0.1
    high = 10 ** math.ceil(math.log10(max(times))) if times else 1.0
    if high <= low:
        high = low * 10
    font = ImageFont.load_default(size=12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = min(460, max([probe.textlength(case, font=font) for case, _ in grouped] + [80]))
    bar, gap, top, bottom, right = 11, 10, 60, 40, 90
    left = int(label_width) + 20
    width = left + 620 + right
    height = top + len(grouped) * (len(IMPLS) * bar + gap) + bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot_width = width - left - right

    def x_of(ms: float) -> float:
        return left + plot_width * (math.log10(ms) - math.log10(low)) / (math.log10(high) - math.log10(low))

    draw.text((10, 8), f"{stem}: milliseconds per case (log scale, lower is better)", fill="black", font=font)
    draw.text((10, 24), str(data.get("device")), fill=(90, 90, 90), font=font)
    for index, impl in enumerate(IMPLS):
        x = left + index * 110
        draw.rectangle((x, 42, x + 12, 52), fill=IMPL_COLOURS[impl])
        draw.text((x + 18, 40), impl, fill="black", font=font)
    decade = low
    while decade <= high * 1.0001:
        x = x_of(decade)
        draw.line((x, top - 4, x, height - bottom), fill=(220, 220, 220))
        draw.text((x - 12, height - bottom + 6), f"{decade:g}", fill="black", font=font)
        decade *= 10
    y = top
    for case, by_impl in grouped:
        shown = case if probe.textlength(case, font=font) <= label_width else case[:60] + "…"
        draw.text((10, y + bar), shown, fill="black", font=font)
        for impl in IMPLS:
            ms = by_impl.get(impl, {}).get("ms")
            if ms:
                end = max(x_of(ms), left + 1)
                draw.rectangle((left, y, end, y + bar - 2), fill=IMPL_COLOURS[impl])
                draw.text((end + 4, y - 2), f"{ms:.3g}", fill="black", font=font)
            else:
                draw.text((left + 4, y - 2), f"{impl}: n/a", fill=(150, 150, 150), font=font)
            y += bar
        y += gap
    draw.line((left, top - 4, left, height - bottom), fill="black")
    image.save(path)
    return path


def render(results_dir: str, out_path: str) -> str:
    """The text of RESULTS.md for `results_dir`; writes the PNGs into `results_dir` as it goes."""
    found = load_results(results_dir)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    parts = ["# Benchmark results", "",
             "Generated by `python -m bench` (or `python -m bench.report`) from the JSON files in "
             f"`{os.path.relpath(results_dir, out_dir)}/`; do not edit by hand. `--quick` CPU smoke "
             "runs (`*_quick.json`) are never shown. Speed-up = baseline ms ÷ our ms (> 1: ours is "
             "faster). % of peak is the share of the binding roof (datasheet TFLOP/s for the input "
             "dtype, or HBM GB/s); bound says which roof the case's FLOP-per-byte puts it under.",
             "", "## Kernel benchmarks", ""]
    if not found["kernel"]:
        parts += ["**No GPU results yet.** No kernel results file here was measured on a GPU; run "
                  "`python -m bench` (or `condense bench`) on a CUDA machine to fill this section.", ""]
    for stem, data in found["kernel"]:
        png = plot_results(stem, data, os.path.join(results_dir, f"{stem}.png"))
        table = TABLES.get(stem, kernel_table)(data)
        parts += [f"### {stem}", "", environment_line(data), "", table, "",
                  f"![{stem}: ms per case]({os.path.relpath(png, out_dir)})", ""]
    if found["cpu"]:
        parts += ["## Kernel benchmarks on a CPU", "",
                  "The native CPU kernels against eager and compiled PyTorch on the same CPU; "
                  "the engine's speed claims are the GPU tables above.", ""]
    for stem, data in found["cpu"]:
        parts += [f"### {stem}", "", environment_line(data), "", TABLES.get(stem, kernel_table)(data), ""]
    parts += [accuracy.accuracy_section(found["accuracy"]), ""]
    return "\n".join(parts)


def write_report(results_dir: str = RESULTS_DIR, out_path: str = REPORT_PATH) -> str:
    """Regenerate the report from `results_dir` into `out_path`; returns `out_path`."""
    text = render(results_dir, out_path)
    with open(out_path, "w") as f:
        f.write(text)
    return out_path


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="folder of results JSON files")
    parser.add_argument("--out", default=REPORT_PATH, help="markdown file to write")
    args = parser.parse_args(argv)
    path = write_report(args.results_dir, args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
