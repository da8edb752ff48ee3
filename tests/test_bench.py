"""The benchmark suite's plumbing: quick runs of every benchmark, the results schema and rows,
RESULTS.md generation (quick and CPU files excluded, speed-ups, PNG plots), the accuracy grid
and the `condense bench` entry point. Everything writes into tmp folders, never bench/results/."""
import argparse
import importlib.util
import json
import os
import subprocess
import time

import pytest
import torch
from PIL import Image

from bench import accuracy, common, condense_time, report, run_all
from bench.baselines.dm_per_class import class_loss
import condense_engine as ce
from condense_engine import bench_cli, datasets
from condense_engine.checkpoint import load_checkpoint
from condense_engine.expert import train_experts
from condense_engine.methods.dm import DM, M3D

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER_KEYS = {"device", "torch", "triton", "cuda", "date", "rows"}
ROW_KEYS = {"bench", "case", "impl", "ms", "tflops", "gbps", "peak_mem_mb", "pct_of_peak"}
IMPLS = ("ours", "eager", "compile")
#: The (bench, impl) pairs every case of a benchmark's quick run has, where they are pinned down.
QUICK_ROWS = {
    "dm_iteration": {(bench, impl) for bench in ("dm_iteration", "m3d_iteration") for impl in IMPLS},
    "condense_time": {("condense_time", "ours")},
    "evaluate": {("evaluate", "ours"), ("evaluate", "eager")},
}
#: Cases a quick run must also have, with their own pairs: DM with the real images streamed from the host,
#: M3D's explicit moment matching.
QUICK_CASE_ROWS = {"dm_iteration": {"quick-ipc2-streamed": {("dm_iteration", "ours")},
                                    "quick-ipc2-moments": {("m3d_iteration", "ours")}}}
#: Keys a benchmark's rows carry beyond ROW_KEYS and "note".
EXTRA_ROW_KEYS = {"condense_time": {"iterations_run", "iterations_target", "seconds_measured",
                                    "seconds_extrapolated", "setup_seconds", "target_seconds"}}
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
    benches = {bench for bench, _ in QUICK_ROWS.get(name, {(name, None)})}
    for row in rows:
        assert ROW_KEYS <= set(row) <= ROW_KEYS | {"note"} | EXTRA_ROW_KEYS.get(name, set())
        assert row["bench"] in benches and row["impl"] in IMPLS
        assert row["ms"] is None or row["ms"] > 0
    assert any(row["impl"] == "ours" and row["ms"] for row in rows)
    special = QUICK_CASE_ROWS.get(name, {})
    assert set(special) <= {row["case"] for row in rows}
    if name in QUICK_ROWS:
        for case in {row["case"] for row in rows}:
            expected = special.get(case, QUICK_ROWS[name])
            assert {(row["bench"], row["impl"]) for row in rows if row["case"] == case} == expected


@pytest.mark.parametrize("options, run, target",
                         [([], 4, 4), (["--iterations", "6", "--measure-iterations", "2"], 2, 6)])
def test_condense_time_reports_measured_and_extrapolated_seconds(options, run, target, tmp_path):
    (row,) = condense_time.main(["--quick", *options, "--out", str(tmp_path / "condense_time_quick.json")])
    assert (row["iterations_run"], row["iterations_target"], row["target_seconds"]) == (run, target, None)
    assert row["seconds_measured"] > 0 and row["ms"] > 0
    if run == target:
        assert row["seconds_extrapolated"] == row["seconds_measured"] and "(all run)" in row["note"]
    else:
        assert row["seconds_extrapolated"] > row["seconds_measured"] and "EXTRAPOLATED" in row["note"]


def test_condense_time_measures_as_many_iterations_as_fit_in_the_seconds_given(tmp_path):
    out = str(tmp_path / "condense_time_quick.json")
    (short,) = condense_time.main(["--quick", "--iterations", "100000", "--measure-seconds", "1e-9", "--out", out])
    assert short["iterations_run"] == condense_time.MIN_MEASURED
    (longer,) = condense_time.main(["--quick", "--iterations", "100000", "--measure-seconds", "2", "--out", out])
    assert longer["iterations_run"] > condense_time.MIN_MEASURED and 0.5 < longer["seconds_measured"] < 20
    assert longer["iterations_target"] == 100000 and "EXTRAPOLATED" in longer["note"]
    with pytest.raises(SystemExit):
        condense_time.main(["--quick", "--measure-seconds", "1", "--measure-iterations", "2", "--out", out])


@pytest.mark.parametrize("method, kernel", [(DM, "linear"), (M3D, "gaussian")])
def test_per_class_baseline_loss_is_the_methods_loss_for_one_class(method, kernel):
    real, syn = torch.randn(12, 16), torch.randn(3, 16)
    ours = method("x", 3, **({} if method is DM else {"normalize": False})).feature_loss(real[None], syn[None])
    torch.testing.assert_close(class_loss(real, syn, kernel), ours)


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


def _toy_kernel_run(compile_note=None) -> common.KernelRun:
    return common.KernelRun(bench="toy", device=torch.device("cpu"), dtype=torch.float32, compile_note=compile_note,
                            peaks=None, name="toy", rows=[], only=None)


def test_kernel_row_is_skipped_without_building_its_inputs_or_fails_into_its_note():
    run = _toy_kernel_run(compile_note="--no-compile")

    def never_built():
        raise AssertionError("a skipped row built its inputs")

    skipped = run.timed_row("case", "compile", never_built, note="variant")
    assert skipped["ms"] is None and skipped["note"] == "variant; skipped: --no-compile"
    assert run.timed_row("case", "ours", never_built, skip="no kernel")["note"] == "skipped: no kernel"

    def out_of_memory():
        raise RuntimeError("out of memory")

    failed = run.timed_row("case", "eager", lambda: out_of_memory, note="variant")
    assert failed["ms"] is None and failed["note"] == "variant; failed: RuntimeError: out of memory"
    timed = run.timed_row("case", "ours", lambda: (lambda: torch.ones(4).sum()), interpreted=True,
                          timing=dict(warmup=0, reps=1), bytes_moved=16.0)
    assert timed["ms"] > 0 and timed["gbps"] == 16.0 / (timed["ms"] * 1e6)
    assert timed["note"] == common.INTERPRETER_NOTE


def test_grad_step_runs_the_forward_without_autograd_or_adds_the_gradient():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not common.grad_step(torch.square, "fwd", (x,), (x,))().requires_grad
    (grad,) = common.grad_step(torch.square, "fwd+bwd", (x,), (x,), torch.tensor([1.0, 3.0]))()
    assert torch.equal(grad, torch.tensor([2.0, 12.0]))


def test_report_shows_an_ablation_row_beside_ours_not_over_it(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _results_file(results, "embed", "NVIDIA H100 80GB HBM3", [
        _row("net", "ours", 2.0), _row("net", "eager", 6.0),
        dict(_row("net", "ours", 3.0), note="ablation: ConvNetBank with the torch epilogue")])
    out = tmp_path / "RESULTS.md"
    report.write_report(str(results), str(out))
    lines = out.read_text().splitlines()
    ours = next(line for line in lines if line.startswith("| net |"))
    ablation = next(line for line in lines if line.startswith("| net (ablation) |"))
    assert ours.startswith("| net | 2 | 6 |") and "| 3× |" in ours
    assert ablation.startswith("| net (ablation) | 3 |") and "ablation: ConvNetBank" in ablation


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
    assert "quick_only_case" not in text
    gpu_part, cpu_part = text.split("## Kernel benchmarks on a CPU")
    assert "cpu_only_case" not in gpu_part and "### dsa" in cpu_part and "| cpu_only_case | 1 |" in cpu_part
    assert "](results/mmd.png)" in text
    with Image.open(results / "mmd.png") as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16)) > 3  # bars and text, not blank
    assert not (results / "mmd_quick.png").exists() and not (results / "dsa.png").exists()


def test_report_names_cases_by_bench_in_a_file_of_two_benches(tmp_path):
    rows = [dict(_row("cifar10-ipc10", "ours", 1.0), bench="dm_iteration"),
            dict(_row("cifar10-ipc10", "eager", 4.0), bench="dm_iteration"),
            dict(_row("cifar10-ipc10", "ours", 2.0), bench="m3d_iteration"),
            dict(_row("cifar10-ipc10", "eager", 10.0), bench="m3d_iteration")]
    _results_file(tmp_path, "dm_iteration", "NVIDIA H100 80GB HBM3", rows)
    text = report.render(str(tmp_path), str(tmp_path / "RESULTS.md"))
    assert "| 4× |" in next(line for line in text.splitlines() if line.startswith("| dm_iteration/cifar10-ipc10 |"))
    assert "| 5× |" in next(line for line in text.splitlines() if line.startswith("| m3d_iteration/cifar10-ipc10 |"))


def test_report_puts_condense_time_against_the_issue_targets(tmp_path):
    timing = dict(iterations_target=20000, setup_seconds=1.0)
    rows = [dict(_row("cifar10-ipc50-dm", "ours", 2.0), bench="condense_time", iterations_run=1000,
                 seconds_measured=3.0, seconds_extrapolated=41.0, target_seconds=60.0, **timing),
            dict(_row("tiny-ipc50-dm", "ours", 70.0), bench="condense_time", iterations_run=20000,
                 seconds_measured=1401.0, seconds_extrapolated=1401.0, target_seconds=1200.0, **timing)]
    _results_file(tmp_path, "condense_time", "NVIDIA H100 80GB HBM3", rows)
    lines = report.render(str(tmp_path), str(tmp_path / "RESULTS.md")).splitlines()
    cifar = next(line for line in lines if line.startswith("| cifar10-ipc50-dm |"))
    assert "| 1000 / 20000 | 3 | 41 (extrapolated) | 60 | yes |" in cifar
    tiny = next(line for line in lines if line.startswith("| tiny-ipc50-dm |"))
    assert "| 20000 / 20000 | 1.4e+03 | 1.4e+03 | 1.2e+03 | no |" in tiny


def test_report_says_when_there_are_no_gpu_results(tmp_path):
    _results_file(tmp_path, "mmd_quick", "cpu (x86_64, 2 cores)", [_row("c", "ours", 1.0)])
    text = report.render(str(tmp_path), str(tmp_path / "RESULTS.md"))
    assert "No GPU results yet" in text and "No accuracy runs recorded yet" in text


def test_accuracy_section_puts_published_numbers_and_recipes_beside_ours(tmp_path):
    recipe = dict(model="ConvNet", repeats=5, epochs=300, lr=0.01, batch_size=256, dsa_strategy="color_crop", seed=3)
    row = dict(method="dm", dataset="fashion-mnist", ipc=10, acc_mean=81.234, acc_std=0.456, repeats=5,
               iterations=2000, seconds=1.0, device="NVIDIA H100", baseline_random=dict(mean=70.0, std=1.0),
               recipe=recipe, schedule=accuracy.schedule_label(2000, 20000, 300), fair=dict(lrs=31.26, ars=55.04))
    _results_file(tmp_path, "accuracy-h100-20260101-000000", "NVIDIA H100", [row])
    text = report.render(str(tmp_path), str(tmp_path / "RESULTS.md"))
    line = next(line for line in text.splitlines() if line.startswith("| dm | fashion-mnist | 10 | 3 |"))
    assert "81.2±0.5 | 70.0±1.0 | 31.3 / 55.0 |" in line
    assert "REDUCED (2000 of 20000 distillation iterations; 300 of 1000 evaluation epochs)" in line
    assert "83.5±0.3" in line and "73.8±0.7" in line  # published DM and random, methods.md §13
    assert "300 epochs" in line and "5 sets × 20 models" in line


def test_m3d_is_compared_with_dm_only_under_the_same_recipe():
    recipe = dict(model="ConvNet", repeats=2, epochs=200, lr=0.01, path="loop")

    def row(method, ipc, mean, std, **extra):
        return dict(dict(method=method, dataset="mnist", ipc=ipc, acc_mean=mean, acc_std=std, iterations=200,
                         options=dict(batch_real=64), recipe=recipe, schedule="REDUCED (x)"), **extra)
    own = dict(method_options=dict(factor=2), options=dict(batch_real=64, factor=2))
    rows = [("a", row("dm", 1, 88.0, 1.0)), ("a", row("m3d", 1, 94.0, 0.5, **own)),
            ("a", row("dm", 10, 95.8, 0.1)), ("b", row("m3d", 10, 95.85, 0.1, recipe=dict(recipe, path="batched", dc_augment=None))),
            ("a", row("m3d", 10, 99.0, 0.1, note="superseded: old defaults")),
            ("a", row("dm", 50, 97.7, 0.1)), ("b", row("m3d", 50, 97.0, 0.1)), ("c", row("m3d", 50, 96.0, 0.1)),
            ("d", row("m3d", 50, 97.75, 0.05, method_options=dict(kernel="poly"))),
            ("e", row("m3d", 50, 98.5, 0.05, method_options=dict(lr_img=3.0), options=dict(batch_real=64, lr_img=3.0))),
            ("a", row("dm", 20, 90.0, 0.1)), ("a", row("m3d", 20, 99.0, 0.1, iterations=400)),
            ("a", row("m3d", 30, 99.0, 0.1))]
    lines = accuracy.method_comparison(rows, "dm", "m3d")
    body = [line for line in lines if line.startswith("| mnist")]
    assert [line.split(" | ")[1:7] for line in body] == [
        ["1", "88.00±1.00", "94.00±0.50", "+6.00", "ahead", "factor=2"],  # own options do not split the recipe
        ["10", "95.80±0.10", "95.85±0.10", "+0.05", "tie", "–"],          # nor how it ran, nor a field added since
        ["50", "97.70±0.10", "97.75±0.05", "+0.05", "tie", "kernel=poly"],  # each setting its own line
        ["50", "97.70±0.10", "96.00±0.10", "-1.70", "behind", "–"]]       # the newest file's row of a setting
    # lr_img is DM's option too: M3D at lr_img 3 is not set against DM at its default 1
    assert "`a.json`, `c.json`" in body[3]
    assert accuracy.method_comparison(rows[-2:], "dm", "m3d") == []


def test_at_a_glance_keeps_the_longest_full_evaluation_of_each_cell_beside_the_published_number():
    def row(method, dataset, ipc, mean, iterations, epochs=1000, **extra):
        return dict(dict(method=method, dataset=dataset, ipc=ipc, acc_mean=mean, acc_std=0.1, iterations=iterations,
                         recipe=dict(epochs=epochs, dsa_strategy="color_crop"), schedule=f"S{iterations}"), **extra)
    rows = [("a", row("dm", "fashion-mnist", 10, 83.0, 2000)), ("b", row("dm", "fashion-mnist", 10, 82.0, 1000)),
            ("c", row("dm", "fashion-mnist", 10, 90.0, 9000, epochs=300)),             # not the full evaluation
            ("d", row("dm", "fashion-mnist", 10, 91.0, 9000, note="superseded: bug")),
            ("e", row("dm", "fashion-mnist", 1, 71.5, 1000)), ("f", row("dm", "fashion-mnist", 50, 87.8, 1000)),
            ("g", row("m3d", "mnist", 1, 95.0, 1000, baseline_random=dict(mean=59.1, std=6.0)))]
    body = [line.split(" | ") for line in accuracy.at_a_glance(rows) if line.startswith("| ") and "IPC" not in line]
    assert [(cells[0][2:], cells[1], cells[2], cells[3], cells[5], cells[-1]) for cells in body] == [
        ("mnist", "1", "m3d", "95.00±0.10", "–", "`g.json` |"),                     # data sets in table order
        ("fashion-mnist", "1", "dm", "71.50±0.10", "+0.80 (at or above)", "`e.json` |"),
        ("fashion-mnist", "10", "dm", "83.00±0.10", "-0.50 (below)", "`a.json` |"),  # 83.5±0.3 published
        ("fashion-mnist", "50", "dm", "87.80±0.10", "-0.30 (within one published std)", "`f.json` |")]  # 88.1±0.6
    assert body[0][6] == "59.1 / 64.9±3.5" and body[2][6] == "– / 73.8±0.7"
    assert accuracy.at_a_glance([("c", rows[2][1])]) == []


def test_iteration_curves_put_one_cells_lengths_on_one_line_with_the_best():
    def row(iterations, mean, seed=0, epochs=1000, lr=0.01, **extra):
        return dict(dict(method="mtt", dataset="mnist", ipc=1, acc_mean=mean, acc_std=0.5, iterations=iterations,
                         options=dict(syn_steps=50), recipe=dict(epochs=epochs, lr=lr, seed=seed, path="loop")),
                    **extra)
    rows = [("a", row(300, 91.3, lr=0.0107)), ("b", row(1000, 90.0, lr=0.0122)),  # the learned lr differs
            ("c", row(2000, 95.0, note="superseded: bug")), ("d", row(3000, 96.0, epochs=300)),
            ("e", row(300, 91.0, seed=1)),                                        # one length: no curve
            ("f", row(1000, 89.0, options=dict(syn_steps=20))),                   # another cell
            ("g", dict(row(1000, 90.5), recipe=dict(epochs=1000, lr=0.0125, seed=0, path="batched")))]
    body = [line.split(" | ") for line in accuracy.iteration_curves(rows) if line.startswith("| mnist")]
    assert body == [["| mnist", "1", "mtt", "0", "300: 91.30±0.50, 1000: 90.50±0.50", "91.30 (after 300)",
                     "`a.json`, `g.json` |"]]  # the newest file of a length, however it was executed
    assert accuracy.iteration_curves(rows[4:6]) == []


def test_at_a_glance_shows_a_method_as_its_defaults_run_it_when_it_can():
    def m3d_row(mean, iterations, kernel):
        return dict(method="m3d", dataset="mnist", ipc=1, acc_mean=mean, acc_std=0.1, iterations=iterations,
                    recipe=dict(epochs=1000, dsa_strategy="color_crop"), schedule="S",
                    method_options=dict(kernel=kernel, factor=2))
    gaussian, moments = m3d_row(95.4, 1000, "gaussian"), m3d_row(90.3, 2000, "moments")
    assert accuracy.default_variant(gaussian) and not accuracy.default_variant(moments)
    assert accuracy.default_variant(dict(gaussian, method_options=None))  # rows from before options were recorded
    for rows in ([("a", gaussian), ("b", moments)], [("b", gaussian), ("a", moments)]):
        (cells,) = [line.split(" | ") for line in accuracy.at_a_glance(rows) if line.startswith("| mnist")]
        assert cells[3] == "95.40±0.10"  # not the variant, newer or longer as it may be
    (cells,) = [line.split(" | ") for line in accuracy.at_a_glance([("b", moments)]) if line.startswith("| mnist")]
    assert cells[3] == "90.30±0.10"  # a variant alone still shows


def test_at_a_glance_prefers_the_published_augmentation_and_flags_any_other():
    def dc_row(mean, iterations, **recipe):
        return dict(method="dc", dataset="mnist", ipc=1, acc_mean=mean, acc_std=0.1, iterations=iterations,
                    recipe=dict(epochs=1000, **recipe), schedule="S")
    with_dsa = dc_row(88.65, 1000, dsa_strategy="color_crop_cutout_scale_rotate")
    as_published = dc_row(91.3, 1000, dsa_strategy=None, dc_augment="crop_scale_rotate")
    assert accuracy.like_published(as_published) and not accuracy.like_published(with_dsa)
    assert not accuracy.like_published(dict(as_published, dataset="fashion-mnist"))  # DC used none there
    for rows in ([("a", as_published), ("b", with_dsa)], [("b", as_published), ("a", with_dsa)]):
        (cells,) = [line.split(" | ") for line in accuracy.at_a_glance(rows) if line.startswith("| mnist")]
        assert cells[3] == "91.30±0.10" and cells[5] == "-0.40 (within one published std)"  # 91.7±0.5
    longer_with_dsa = dict(with_dsa, iterations=2000)
    (cells,) = [line.split(" | ") for line in accuracy.at_a_glance([("a", longer_with_dsa)])
                if line.startswith("| mnist")]
    assert cells[5] == "-3.05 (below; not like-for-like: evaluated with DSA color_crop_cutout_scale_rotate)"
    assert accuracy.recipe_text(dict(as_published, model="ConvNet", lr=0.01, batch_size=256, repeats=3,
                                     **as_published["recipe"])).count("DC crop_scale_rotate") == 1


def test_dc_outside_mnist_counts_as_published_after_300_epochs_without_augmentation():
    plain = accuracy.published_augmentation("dc", "fashion-mnist")
    assert plain == dict(dsa=False, dc_augment=None) and accuracy.published_epochs(plain) == 300
    assert accuracy.published_epochs(accuracy.published_augmentation("dc", "mnist")) == 1000
    assert accuracy.published_epochs(accuracy.published_augmentation("dm", "fashion-mnist")) == 1000
    assert accuracy.schedule_label(500, 500, 300, full_epochs=300) == "published schedule"
    assert accuracy.schedule_label(500, 500, 300) == "REDUCED (300 of 1000 evaluation epochs)"
    row = dict(method="dc", dataset="fashion-mnist", ipc=1, acc_mean=70.9, acc_std=0.2, iterations=1000,
               recipe=dict(epochs=300, dsa_strategy=None, dc_augment=None), schedule="S")
    (cells,) = [line.split(" | ") for line in accuracy.at_a_glance([("a", row)]) if line.startswith("| fashion")]
    assert cells[5] == "+0.40 (at or above)"  # 70.5±0.6 published
    assert accuracy.at_a_glance([("a", dict(row, method="dm"))]) == []  # DM's published evaluation is 1000 epochs


def test_accuracy_rows_show_our_own_method_defaults_and_notes():
    row = dict(schedule="REDUCED (x)", method_options=dict(factor=2, kernel="gaussian"), note="superseded: old defaults")
    assert accuracy.schedule_text(row) == "REDUCED (x); options factor=2, kernel=gaussian; **superseded: old defaults**"
    assert accuracy.schedule_text(dict(schedule="published schedule")) == "published schedule"
    assert accuracy.schedule_text(dict(schedule="S", extended_from=dict(folder="f", iteration=6000))) == \
        "S; continues the 6000-iteration run of this cell"


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


def test_accuracy_fair_rows_carry_the_robust_scores_of_their_accuracies(tmp_path):
    out = tmp_path / "accuracy-cpu-fair_quick.json"
    row, = accuracy.main(["--quick", "--methods", "dm", "--fair", "--out", str(out), "--no-report"])
    fair = row["fair"]
    assert fair["accuracies"]["set"] == pytest.approx(row["acc_mean"])
    assert fair["accuracies"]["random"] == pytest.approx(row["baseline_random"]["mean"])
    assert fair["ior"] == pytest.approx(row["acc_mean"] - row["baseline_random"]["mean"])
    assert 0 <= fair["lrs"] <= 100 and 0 <= fair["ars"] <= 100 and fair["full_data"].startswith("measured")
    assert accuracy.full_data_accuracy("fashion-mnist") == pytest.approx(0.935)
    with pytest.raises(ValueError, match="drop --no-baseline"):
        accuracy.main(["--quick", "--methods", "dm", "--fair", "--no-baseline", "--out", str(out), "--no-report"])
    with pytest.raises(ValueError, match="add --dsa-eval"):
        accuracy.main(["--quick", "--methods", "dc", "--fair", "--out", str(out), "--no-report"])


@pytest.mark.parametrize("where", ["--out", "--save-dir", "--report"])
def test_accuracy_refuses_an_unwritable_destination_before_any_cell(tmp_path, monkeypatch, where):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(accuracy, "measure", lambda *a, **k: pytest.fail("a cell ran before the check"))
    paths = {"--out": str(tmp_path / "r.json"), "--save-dir": str(tmp_path / "cells"), "--report": str(tmp_path / "R.md")}
    paths[where] = str(blocked / "inside")
    with pytest.raises(ValueError, match="cannot write .*a-file"):
        accuracy.main(["--quick", "--methods", "dm", *[part for pair in paths.items() for part in pair]])


def test_accuracy_evaluates_dc_with_its_own_augmentation_unless_told_dsa(tmp_path):
    """DC's published MNIST numbers were evaluated with DC's augmentation; --dsa-eval puts DC
    under the DSA recipe every other method uses."""
    out = tmp_path / "accuracy-cpu-dc_quick.json"
    row, = accuracy.main(["--quick", "--methods", "dc", "--no-baseline", "--out", str(out), "--no-report"])
    assert row["recipe"]["dc_augment"] == "crop_scale_rotate" and row["recipe"]["dsa_strategy"] is None
    row, = accuracy.main(["--quick", "--methods", "dc", "--no-baseline", "--dsa-eval", "--out", str(out),
                          "--no-report"])
    assert row["recipe"]["dc_augment"] is None and row["recipe"]["dsa_strategy"] == "color_crop_cutout_scale_rotate"


def test_accuracy_evaluates_dd_by_replaying_its_learned_steps_unless_told_dsa(tmp_path):
    """DD's published numbers trained fresh networks by its learned steps; --dsa-eval puts DD under
    the standard recipe, and fair scores (built on DSA) are refused before any distillation. The
    replay runs on the student the steps were learned for."""
    out = tmp_path / "accuracy-cpu-dd_quick.json"
    row, = accuracy.main(["--quick", "--methods", "dd", "--set", "model=LeNet", "--out", str(out), "--no-report"])
    assert row["recipe"]["recipe"] == "dd" and row["recipe"]["dsa_strategy"] is None
    assert row["recipe"]["model"] == "LeNet" and "LeNet, DD's replay" in accuracy.recipe_text(row["recipe"])
    assert row["baseline_random"] is not None and "evaluation epochs" not in row["schedule"]
    assert accuracy.like_published(row) and accuracy.current_full_evaluation(row)
    assert "DD's replay" in accuracy.recipe_text(row["recipe"])
    (cells,) = [line.split(" | ") for line in accuracy.at_a_glance([("a", row)]) if line.startswith("| default")]
    assert cells[2] == "dd"
    # The published random-real number (DC's protocol) is not set beside a replay baseline.
    mnist = dict(row, dataset="mnist", ipc=10)
    (cells,) = [line.split(" | ") for line in accuracy.at_a_glance([("a", mnist)]) if line.startswith("| mnist")]
    assert cells[6] == f"{row['baseline_random']['mean']:.1f} / – (DD's replay)"
    (line,) = [line for line in accuracy.accuracy_section([("a", {"rows": [mnist]})]).splitlines()
               if line.startswith("| dd | mnist | 10 |")]
    assert "| – (DD's replay) |" in line and "95.1" not in line
    row, = accuracy.main(["--quick", "--methods", "dd", "--no-baseline", "--dsa-eval", "--out", str(out),
                          "--no-report"])
    assert row["recipe"]["recipe"] == "dc" and row["recipe"]["dsa_strategy"] is not None
    assert not accuracy.like_published(row)
    assert not accuracy.like_published(dict(row, method="idc"))  # IDC's published evaluation is its own recipe
    assert accuracy.like_published(dict(row, method="idc", recipe=dict(row["recipe"], recipe="idc")))
    with pytest.raises(ValueError, match="replay"):
        accuracy.main(["--quick", "--methods", "dd", "--fair", "--out", str(out), "--no-report"])


def test_accuracy_quick_runs_a_method_without_the_quick_options_it_lacks(tmp_path):
    out = tmp_path / "accuracy-cpu-dq_quick.json"
    row, = accuracy.main(["--quick", "--methods", "dq", "--no-baseline", "--out", str(out), "--no-report"])
    assert row["method"] == "dq" and 0 <= row["acc_mean"] <= 100 and "batch_real" not in row["schedule"]


def test_accuracy_m3d_rows_record_its_own_defaults_and_may_skip_the_baseline(tmp_path):
    out = tmp_path / "accuracy-cpu-m3d_quick.json"
    row, = accuracy.main(["--quick", "--methods", "m3d", "--no-baseline", "--out", str(out), "--no-report"])
    assert row["baseline_random"] is None
    assert row["method_options"] == dict(kernel="gaussian", factor=2, normalize=True, lr_img=1.0, model_steps=1)


@pytest.mark.parametrize("kernel, reported", [("gaussian", False), ("poly", True), ("moments", True)])
def test_accuracy_rows_report_the_degree_of_the_kernels_it_changes(kernel, reported):
    meta = dict(method="m3d", options=dict(M3D("mnist", 1, kernel=kernel, degree=4).options))
    options = accuracy.reported_options(meta)
    assert options["kernel"] == kernel and options.get("degree") == (4 if reported else None)


def test_accuracy_trajectory_rows_describe_the_expert_buffer_they_matched(tmp_path):
    """The buffer's size, not its local path, labels the run: MTT's number depends on it."""
    folder = tmp_path / "experts"
    train_experts(datasets.load("default", split="train"), 1, 1, model="ConvNetD1", out=folder, device="cpu")
    row, = accuracy.main(["--quick", "--methods", "mtt", "--no-baseline", "--set", f"buffer={folder}",
                          "--set", "model=ConvNetD1", "--set", "expert_epochs=1", "--set", "max_start_epoch=1",
                          "--set", "syn_steps=2", "--out", str(tmp_path / "accuracy-cpu-mtt_quick.json"),
                          "--no-report"])
    assert row["expert_buffer"] == dict(experts=1, epochs=1, model="ConvNetD1", optimizer="sgd", lr=0.01,
                                        augmentation="color_crop_cutout_scale_rotate", zca=False, seed=0)
    assert row["schedule"].startswith("REDUCED (expert buffer 1 expert × 1 epoch instead of 100 × 50; model ConvNetD1")
    assert str(folder) not in row["schedule"]


def test_a_buffer_as_large_as_published_is_not_a_reduction():
    class Buffer:
        num_epochs = 50

        def __len__(self):
            return 100
    assert accuracy.buffer_change("mtt", Buffer()) is None
    assert accuracy.buffer_change("datm", Buffer()) == ("100 experts × 50 epochs", "100 × 100")
    assert accuracy.buffer_change("a-method-without-a-published-buffer", Buffer()) is None


def test_accuracy_save_dir_resumes_a_stopped_cell_and_reuses_a_finished_one(tmp_path):
    save_dir = tmp_path / "sets"
    args = ["--quick", "--methods", "dm", "--no-baseline", "--no-report", "--save-dir", str(save_dir)]
    first, = accuracy.main(args + ["--out", str(tmp_path / "a_quick.json")])
    folder, = save_dir.iterdir()
    finished = ce.SyntheticSet.load(folder / "synset.pt")
    assert {"synset.pt", "checkpoint.pt", "log.jsonl"} <= {p.name for p in folder.iterdir()}
    assert "resumed_from" not in first and "reused" not in first

    (folder / "synset.pt").unlink()  # stopped after its last checkpoint: the rerun only loads it
    start = time.perf_counter()
    resumed, = accuracy.main(args + ["--out", str(tmp_path / "b_quick.json")])
    resume_wall = time.perf_counter() - start
    assert resumed["resumed_from"] == accuracy.QUICK["iterations"]
    earlier = accuracy.earlier_seconds(str(folder / "log.jsonl"), resumed["resumed_from"])
    assert 0 < earlier <= resumed["seconds"] <= earlier + resume_wall  # the first run's time, counted once
    assert torch.equal(ce.SyntheticSet.load(folder / "synset.pt").images, finished.images)

    reused, = accuracy.main(args + ["--out", str(tmp_path / "c_quick.json")])
    assert reused["reused"] == str(folder / "synset.pt") and reused["seconds"] == resumed["seconds"]
    assert reused["acc_mean"] == resumed["acc_mean"]

    with pytest.raises(ValueError, match="other options or seed"):
        accuracy.main(args + ["--set", "batch_real=8", "--out", str(tmp_path / "d_quick.json")])


def test_accuracy_save_dir_resumes_a_checkpoint_whose_log_was_lost_and_says_the_seconds_miss_it(tmp_path, capsys):
    save_dir = tmp_path / "sets"
    args = ["--quick", "--methods", "dm", "--no-baseline", "--no-report", "--save-dir", str(save_dir)]
    accuracy.main(args + ["--out", str(tmp_path / "a_quick.json")])
    folder, = save_dir.iterdir()
    (folder / "synset.pt").unlink()
    (folder / "log.jsonl").unlink()
    start = time.perf_counter()
    resumed, = accuracy.main(args + ["--out", str(tmp_path / "b_quick.json")])
    assert resumed["unlogged_iterations"] == accuracy.QUICK["iterations"] == resumed["resumed_from"]
    assert resumed["seconds"] <= time.perf_counter() - start
    assert "log.jsonl is missing: the seconds recorded leave out the 2 iterations" in capsys.readouterr().err
    reused, = accuracy.main(args + ["--out", str(tmp_path / "c_quick.json")])
    assert reused["unlogged_iterations"] == resumed["unlogged_iterations"]
    assert accuracy.schedule_text(reused).endswith("; distill s leave out its first 2 iterations (their log was lost)")


def test_accuracy_save_dir_extends_the_same_cell_run_shorter(tmp_path, monkeypatch):
    """A longer cell starts from the last state of the same cell with fewer iterations and
    lands exactly where a run from scratch does; a shorter cell with other options is not used."""
    save_dir, scratch = tmp_path / "sets", tmp_path / "scratch"
    args = ["--quick", "--methods", "dm", "--no-baseline", "--no-report"]
    short, = accuracy.main(args + ["--save-dir", str(save_dir), "--out", str(tmp_path / "a_quick.json")])
    monkeypatch.setitem(accuracy.QUICK, "iterations", 3)
    other, = accuracy.main(args + ["--set", "batch_real=8", "--save-dir", str(save_dir), "--out", str(tmp_path / "b_quick.json")])
    assert "extended_from" not in other  # the 2-iteration cell has batch_real 16
    monkeypatch.setitem(accuracy.QUICK, "iterations", 4)
    long, = accuracy.main(args + ["--save-dir", str(save_dir), "--out", str(tmp_path / "d_quick.json")])
    source = str(save_dir / "dm-default-ipc1-it2-seed0")
    assert long["extended_from"] == dict(folder=source, iteration=2) and long["resumed_from"] == 2
    assert long["seconds"] > short["seconds"]
    from_scratch, = accuracy.main(args + ["--save-dir", str(scratch), "--out", str(tmp_path / "e_quick.json")])
    assert "extended_from" not in from_scratch
    extended = ce.SyntheticSet.load(save_dir / "dm-default-ipc1-it4-seed0" / "synset.pt")
    assert torch.equal(extended.images, ce.SyntheticSet.load(scratch / "dm-default-ipc1-it4-seed0" / "synset.pt").images)
    assert load_checkpoint(os.path.join(source, "checkpoint.pt"))["iteration"] == 2  # the shorter cell is kept
    reused, = accuracy.main(args + ["--save-dir", str(save_dir), "--out", str(tmp_path / "f_quick.json")])
    assert reused["extended_from"] == long["extended_from"] and reused["acc_mean"] == long["acc_mean"]


def test_earlier_seconds_counts_each_process_up_to_where_the_next_resumed(tmp_path):
    log = tmp_path / "log.jsonl"
    # process 1 ran to iteration 6 and checkpointed at 4; process 2 resumed at 4, ran to 7,
    # checkpointed at 6; the third resumes from 6.
    records = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 6.0), (5, 0.5), (6, 1.5), (7, 2.5)]
    log.write_text("".join(json.dumps(dict(iteration=i, seconds=s)) + "\n" for i, s in records))
    assert accuracy.earlier_seconds(str(log), 6) == pytest.approx(4.0 + 1.5)


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


def _gpu_plan(tmp_path, seconds: int, done: set[str]):
    """tools/gpu_session.sh plan SECONDS in a session folder where the tasks in `done` already ran."""
    session = tmp_path / "session"
    (session / "done").mkdir(parents=True)
    for task in done:
        (session / "done" / task).touch()
    env = dict(os.environ, GPU_SESSION_DIR=str(session), OUT=str(tmp_path / "out"))
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "tools", "gpu_session.sh"), "plan", str(seconds)],
                            env=env, capture_output=True, text=True, timeout=60)
    return result, {path.name for path in (session / "done").iterdir()}


def test_gpu_plan_stops_before_a_step_it_has_no_time_for_and_leaves_it_for_the_next_call(tmp_path):
    result, done = _gpu_plan(tmp_path, 30, {"install", "kernel-tests"})
    assert "plan: out of time before mmd" in result.stdout
    assert done == {"install", "kernel-tests"}
    assert (tmp_path / "out" / "gpu-results.tgz").is_file()


def _gpu_plan_steps() -> set[str]:
    """The steps of the script's PLAN=(...) line."""
    with open(os.path.join(REPO_ROOT, "tools", "gpu_session.sh"), encoding="utf-8") as f:
        (line,) = [line for line in f if line.startswith("PLAN=(")]
    return set(line[len("PLAN=("):line.index(")")].split())


def test_gpu_plan_skips_the_steps_an_earlier_call_ran(tmp_path):
    steps = _gpu_plan_steps()
    assert {"install", "kernel-tests", "mmd", "dsa", "dm_iteration", "tests"} <= steps
    result, done = _gpu_plan(tmp_path, 600, steps)
    assert result.returncode == 0 and "=== plan:" not in result.stdout
    assert done == steps
