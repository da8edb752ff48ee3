"""The benchmark suite's plumbing: quick runs of every kernel benchmark, the results schema,
RESULTS.md generation (quick and CPU files excluded, speed-ups, PNG plots), the accuracy grid
and the `condense bench` entry point. Everything writes into tmp folders, never bench/results/."""
import argparse
import importlib.util
import json
import os

import pytest
import torch
from PIL import Image

from bench import accuracy, report, run_all
from condense_engine import bench_cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER_KEYS = {"device", "torch", "triton", "cuda", "date", "rows"}
ROW_KEYS = {"bench", "case", "impl", "ms", "tflops", "gbps", "peak_mem_mb", "pct_of_peak"}
ACCURACY_KEYS = {"method", "dataset", "ipc", "acc_mean", "acc_std", "repeats", "iterations", "seconds",
                 "device", "baseline_random", "recipe"}


@pytest.mark.parametrize("name", run_all.BENCHMARKS)
def test_quick_benchmark_writes_rows_in_the_results_schema(name, tmp_path):
    if importlib.util.find_spec(f"bench.{name}") is None:
        pytest.skip(f"bench/{name}.py does not exist yet")
    rows = run_all.run_benchmark(name, quick=True, results_dir=str(tmp_path))
    with open(tmp_path / f"{name}_quick.json") as f:
        data = json.load(f)
    assert set(data) == HEADER_KEYS
    assert data["rows"] == rows and rows
    for row in rows:
        assert ROW_KEYS <= set(row) <= ROW_KEYS | {"note"}
        assert row["bench"] == name and row["impl"] in ("ours", "eager", "compile")
        assert row["ms"] is None or row["ms"] > 0
    assert any(row["impl"] == "ours" and row["ms"] for row in rows)


def test_missing_benchmark_module_is_skipped_with_a_message(tmp_path, capsys):
    rows, skipped, failed = run_all.run_benchmarks(["no_such_benchmark"], True, str(tmp_path))
    assert (rows, skipped, failed) == ([], ["no_such_benchmark"], [])
    assert "skipped no_such_benchmark" in capsys.readouterr().out


def _results_file(folder, name: str, device: str, rows: list[dict]) -> None:
    header = dict(device=device, torch="2.13.0", triton="3.9.0", cuda="12.8", date="2026-01-01T00:00:00+00:00")
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(dict(header, rows=rows), f)


def _row(case: str, impl: str, ms: float | None, **extra) -> dict:
    return dict(bench="mmd", case=case, impl=impl, ms=ms, tflops=extra.get("tflops"), gbps=extra.get("gbps"),
                peak_mem_mb=None, pct_of_peak=extra.get("pct_of_peak"))


def test_report_tables_gpu_results_with_speedups_and_plots(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _results_file(results, "mmd", "NVIDIA H100 80GB HBM3", [
        _row("big_case", "ours", 2.0, tflops=400.0, gbps=100.0, pct_of_peak=400.0 / 494.0 * 100),
        _row("big_case", "eager", 8.0), _row("big_case", "compile", 5.0),
        _row("small_case", "ours", 0.5, tflops=1.0, gbps=3000.0, pct_of_peak=3000.0 / 3350.0 * 100),
        _row("small_case", "eager", 0.25), _row("small_case", "compile", None)])
    _results_file(results, "mmd_quick", "NVIDIA H100 80GB HBM3", [_row("quick_only_case", "ours", 1.0)])
    _results_file(results, "dsa", "cpu (x86_64, 2 cores)", [_row("cpu_only_case", "ours", 1.0)])
    out = tmp_path / "RESULTS.md"
    report.write_report(str(results), str(out))
    text = out.read_text()

    big = next(line for line in text.splitlines() if line.startswith("| big_case"))
    assert "| 4× | 2.5× |" in big and "| compute |" in big
    small = next(line for line in text.splitlines() if line.startswith("| small_case"))
    assert "| 0.5× | – |" in small and "| memory |" in small
    assert "NVIDIA H100 80GB HBM3" in text and "No GPU results yet" not in text
    assert "quick_only_case" not in text and "cpu_only_case" not in text and "`dsa.json`" in text
    assert "](results/mmd.png)" in text
    with Image.open(results / "mmd.png") as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16)) > 3  # bars and text, not blank
    assert not (results / "mmd_quick.png").exists()


def test_report_says_when_there_are_no_gpu_results(tmp_path):
    _results_file(tmp_path, "mmd_quick", "cpu (x86_64, 2 cores)", [_row("c", "ours", 1.0)])
    text = report.render(str(tmp_path), str(tmp_path / "RESULTS.md"))
    assert "No GPU results yet" in text and "No accuracy runs recorded yet" in text


def test_accuracy_section_puts_published_numbers_and_recipes_beside_ours(tmp_path):
    recipe = dict(model="ConvNet", repeats=5, epochs=300, lr=0.01, batch_size=256, dsa_strategy="color_crop")
    row = dict(method="dm", dataset="fashion-mnist", ipc=10, acc_mean=81.234, acc_std=0.456, repeats=5,
               iterations=2000, seconds=1.0, device="NVIDIA H100", baseline_random=dict(mean=70.0, std=1.0),
               recipe=recipe, schedule=accuracy.schedule_label(2000, 20000, 300))
    _results_file(tmp_path, "accuracy-h100-20260101-000000", "NVIDIA H100", [row])
    text = report.render(str(tmp_path), str(tmp_path / "RESULTS.md"))
    line = next(line for line in text.splitlines() if line.startswith("| dm | fashion-mnist | 10 |"))
    assert "81.2±0.5" in line and "70.0±1.0" in line
    assert "REDUCED (2000 of 20000 distillation iterations; 300 of 1000 evaluation epochs)" in line
    assert "83.5±0.3" in line and "73.8±0.7" in line  # published DM and random, methods.md §13
    assert "300 epochs" in line and "5 sets × 20 models" in line


def test_schedule_label_only_calls_the_full_schedule_published():
    assert accuracy.schedule_label(20000, 20000, 1000) == "published schedule"
    assert accuracy.schedule_label(20000, 20000, 999).startswith("REDUCED")
    assert accuracy.schedule_label(10, 20000, 1000).startswith("REDUCED")
    assert (accuracy.schedule_label(20000, 20000, 1000, {"batch_real": (64, 256)})
            == "REDUCED (batch_real 64 instead of 256)")


def test_accuracy_quick_writes_rows_with_the_documented_keys(tmp_path):
    out = tmp_path / "accuracy-cpu-test_quick.json"
    rows = accuracy.main(["--quick", "--methods", "dm", "--out", str(out), "--no-report"])
    with open(out) as f:
        data = json.load(f)
    assert data["rows"] == rows and len(rows) == 1
    row = rows[0]
    assert ACCURACY_KEYS <= set(row)
    assert (row["method"], row["dataset"], row["ipc"]) == ("dm", "default", 1)
    assert 0.0 <= row["acc_mean"] <= 100.0 and 0.0 <= row["baseline_random"]["mean"] <= 100.0
    assert row["schedule"].startswith("REDUCED") and row["recipe"]["epochs"] == accuracy.QUICK["epochs"]


def test_condense_bench_finds_the_checkout_or_says_it_needs_one(tmp_path, monkeypatch, capsys):
    assert bench_cli.find_checkout([str(tmp_path), REPO_ROOT]) == REPO_ROOT
    monkeypatch.setattr(bench_cli, "candidate_roots", lambda: [str(tmp_path)])
    parser = argparse.ArgumentParser()
    bench_cli.add_bench_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--only", "mmd"])
    assert (args.quick, args.only) == (True, ["mmd"])
    assert bench_cli.run_bench_command(args) == 2
    assert "needs a source checkout" in capsys.readouterr().err


def test_concurrent_accuracy_runs_get_distinct_files(tmp_path):
    device = torch.device("cpu")
    paths = {accuracy.default_out_path(device, False, str(tmp_path)) for _ in range(3)}
    assert len(paths) == 3 and all(os.path.exists(p) for p in paths)
