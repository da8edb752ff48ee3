"""`condense` command smoke tests on the embedded default set (tiny schedules)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from condense_engine.cli import main


def test_help_runs_as_a_console_script():
    result = subprocess.run([sys.executable, "-m", "condense_engine.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("distill", "evaluate", "show", "datasets"):
        assert command in result.stdout


def test_datasets_list(capsys):
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "default" in out and "tinyimagenet" in out


def test_distill_evaluate_show_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["distill", "--dataset", "default", "--ipc", "2", "--iterations", "2", "--set", "batch_real=4",
                 "--set", "model='ConvNetW32'", "--out", str(out), "--quiet", "--evaluate", "--baseline",
                 "--model", "ConvNetW32", "--epochs", "2", "--repeats", "1", "--device", "cpu"])
    assert code == 0
    for name in ("synset.pt", "grid.png", "log.jsonl", "checkpoint.pt", "report.json", "evaluation-runs.pt"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    for key in ("accuracy_mean", "accuracy_std", "random_baseline_mean", "seconds", "schedule"):
        assert key in report
    assert report["schedule"]["iterations"] == 2
    assert "random real baseline" in capsys.readouterr().out

    assert main(["show", str(out / "synset.pt"), "--out", str(tmp_path / "g.png")]) == 0
    assert os.path.getsize(tmp_path / "g.png") > 0
    assert main(["evaluate", str(out / "synset.pt"), "--model", "ConvNetW32", "--epochs", "1",
                 "--repeats", "1", "--out", str(tmp_path / "e.json"), "--device", "cpu", "--recipe", "idc"]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert "accuracy_mean" in evaluated
    assert evaluated["evaluations"][0]["recipe"]["recipe"] == "idc"
    assert evaluated["evaluations"][0]["recipe"]["batch_size"] == 64
    assert main(["evaluate", str(out / "synset.pt"), "--model", "ConvNetW32", "--epochs", "1", "--repeats", "1",
                 "--out", str(tmp_path / "e.json"), "--device", "cpu", "--dc-augment", "crop_scale_rotate"]) == 0
    recipe = json.loads((tmp_path / "e.json").read_text())["evaluations"][0]["recipe"]
    assert recipe["dc_augment"] == "crop_scale_rotate" and recipe["dsa_strategy"] is None


def test_distill_dd_then_evaluate_it_by_replaying_its_learned_steps(tmp_path):
    out = tmp_path / "run"
    assert main(["distill", "--dataset", "default", "--method", "dd", "--ipc", "1", "--iterations", "1",
                 "--set", "batch_real=10", "--set", "model='ConvNetW32'", "--out", str(out), "--quiet",
                 "--device", "cpu", "--evaluate", "--recipe", "dd", "--model", "ConvNetW32", "--repeats", "1"]) == 0
    assert json.loads((out / "report.json").read_text())["evaluations"][0]["recipe"]["recipe"] == "dd"
    # Without --model the replay runs on the student the steps were learned for.
    assert main(["evaluate", str(out / "synset.pt"), "--repeats", "2", "--baseline",
                 "--recipe", "dd", "--out", str(tmp_path / "e.json"), "--device", "cpu"]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["evaluations"][0]["recipe"]["model"] == "ConvNetW32"
    assert len(evaluated["evaluations"][0]["accuracies"]) == 2 and "random_baseline_mean" in evaluated
    assert evaluated["evaluations"][0]["recipe"]["schedule"].startswith("the set's 3 learned step sizes")


def test_evaluate_fair_writes_the_robust_scores(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--dataset", "default", "--ipc", "1", "--iterations", "1", "--set", "batch_real=4",
                 "--set", "model='ConvNetW32'", "--out", str(out), "--quiet", "--device", "cpu",
                 "--real-images-on", "host"]) == 0
    command = ["evaluate", str(out / "synset.pt"), "--model", "ConvNetW32", "--epochs", "1", "--repeats", "1",
               "--fair", "--full-accuracy", "0.99", "--out", str(tmp_path / "e.json"), "--device", "cpu",
               "--checkpoint", str(tmp_path / "runs.pt")]
    assert main(command) == 0
    fair = json.loads((tmp_path / "e.json").read_text())["fair"]
    assert fair["accuracies"]["full_data"] == 0.99 and 0 <= fair["lrs"] <= 1 and 0 <= fair["ars"] <= 1
    assert "LRS" in capsys.readouterr().out
    kept = torch.load(tmp_path / "runs.pt", weights_only=True)["runs"]
    assert len(kept) == 4  # the set and its random baseline, with and without DSA, one run each
    assert main(command) == 0  # again: every run comes from the file
    assert json.loads((tmp_path / "e.json").read_text())["fair"] == fair


def test_resume_with_more_iterations_extends_a_finished_run(tmp_path):
    from condense_engine.synset import SyntheticSet

    def distill(out, iterations, *extra):
        return main(["distill", "--dataset", "default", "--ipc", "1", "--iterations", str(iterations),
                     "--set", "batch_real=4", "--set", "model='ConvNetW32'", "--out", str(out), "--quiet",
                     "--device", "cpu", *extra])

    assert distill(tmp_path / "long", 4) == 0
    assert distill(tmp_path / "run", 2) == 0
    assert distill(tmp_path / "run", 4, "--resume") == 0
    extended = SyntheticSet.load(tmp_path / "run" / "synset.pt")
    assert extended.meta["iterations"] == 4
    assert extended.images.equal(SyntheticSet.load(tmp_path / "long" / "synset.pt").images)
    assert [json.loads(line)["iteration"] for line in open(tmp_path / "run" / "log.jsonl")] == [1, 2, 3, 4]


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["distill", "--dataset", "mnist", "--root", str(tmp_path / "nowhere"), "--quiet",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "error" in err
    assert main(["distill", "--dataset", "default", "--ipc", "5000", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "larger than class" in capsys.readouterr().err
    assert main(["distill", "--dataset", "default", "--sync-every", "0", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "sync_every" in capsys.readouterr().err


def test_bad_option_syntax():
    with pytest.raises(SystemExit):
        main(["distill", "--set", "novalue"])


def test_experts_command_trains_a_buffer(tmp_path):
    out = tmp_path / "experts"
    assert main(["experts", "--dataset", "default", "--num-experts", "1", "--epochs", "1", "--model", "ConvNetD1",
                 "--device", "cpu", "--out", str(out)]) == 0
    from condense_engine.expert import load_experts

    buffer = load_experts(str(out))
    assert len(buffer) == 1


def test_distill_tensorboard_writes_events_into_the_output_folder(tmp_path, monkeypatch, capsys):
    arguments = ["distill", "--dataset", "default", "--ipc", "1", "--iterations", "2", "--set", "batch_real=4",
                 "--set", "model='ConvNetW32'", "--quiet", "--device", "cpu", "--tensorboard"]
    assert main([*arguments, "--out", str(tmp_path / "run")]) == 0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "run" / "tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    assert main([*arguments, "--out", str(tmp_path / "without")]) == 2
    assert "error: TensorBoard logging needs the tensorboard package" in capsys.readouterr().err


def test_a_torchrun_rank_ends_through_exit_rank_with_the_command_status(monkeypatch, tmp_path):
    from condense_engine import distributed

    codes = []
    monkeypatch.setattr(distributed, "exit_rank", codes.append)
    assert main(["datasets", "list"]) == 0
    assert codes == []  # a plain process returns
    monkeypatch.setenv("WORLD_SIZE", "2")
    main(["datasets", "list"])
    main(["evaluate", str(tmp_path / "missing.pt")])
    assert codes == [0, 2]


def test_a_torchrun_rank_prints_an_unexpected_error_and_ends_through_exit_rank(monkeypatch, capsys):
    from condense_engine import cli, distributed

    def broken(args):
        raise RuntimeError("a worker fell over")

    codes = []
    monkeypatch.setattr(distributed, "exit_rank", codes.append)
    monkeypatch.setitem(cli.COMMANDS, "show", broken)
    with pytest.raises(RuntimeError, match="fell over"):
        main(["show", "set.pt"])  # a plain process raises as usual
    monkeypatch.setenv("WORLD_SIZE", "2")
    main(["show", "set.pt"])
    assert codes == [1]
    assert "RuntimeError: a worker fell over" in capsys.readouterr().err


def test_evaluate_asks_for_the_data_set_when_the_set_does_not_name_it(tmp_path, capsys):
    from condense_engine.synset import SyntheticSet

    path = tmp_path / "anonymous.pt"
    SyntheticSet(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]), mean=(0.5,), std=(0.5,), num_classes=2).save(path)
    assert main(["evaluate", str(path)]) == 2
    assert "pass --dataset" in capsys.readouterr().err


def test_exit_rank_flushes_the_output_and_skips_finalisation():
    script = ("import atexit, sys\nfrom condense_engine.distributed import exit_rank\n"
              "atexit.register(lambda: print('finalised'))\nprint('written', end='')\n"
              "print('warned', end='', file=sys.stderr)\nexit_rank(3)\n")
    buffered = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=buffered)
    assert (result.returncode, result.stdout, result.stderr) == (3, "written", "warned")


def test_distill_under_torchrun_shards_classes_and_rank_0_writes_the_set(tmp_path):
    from condense_engine.synset import SyntheticSet

    arguments = ["distill", "--dataset", "default", "--ipc", "1", "--iterations", "3", "--set", "batch_real=4",
                 "--set", "model='ConvNetW32'", "--quiet", "--device", "cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "condense_engine.cli", *arguments, "--out", str(tmp_path / "ranks")]
    result = subprocess.run(launch, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("synthetic set:") == 1
    assert main([*arguments, "--out", str(tmp_path / "one")]) == 0
    sharded = SyntheticSet.load(tmp_path / "ranks" / "synset.pt")
    assert sharded.meta["ranks"] == 2
    torch.testing.assert_close(sharded.images, SyntheticSet.load(tmp_path / "one" / "synset.pt").images,
                               rtol=1e-4, atol=1e-4)
