"""Accuracy of condensed sets under the evaluation protocol, next to the published numbers.

    python -m bench.accuracy --methods dm m3d --datasets mnist fashion-mnist --ipcs 1 10 50
                             [--iterations N] [--epochs E] [--repeats R] [--data-root DIR]
                             [--device cuda] [--quick]

For every method × data set × IPC: `ce.distill`, then `ce.evaluate` (SPEC §6 = methods.md §1.6:
fresh ConvNets, SGD momentum 0.9, lr 0.01, ×0.1 at half, DSA, `--epochs` epochs) with the
random-real baseline of the same size. Rows go to bench/results/accuracy-<device>-<date>.json
(written after every cell, so a long run keeps what it finished) and RESULTS.md is regenerated.
A run with fewer distillation iterations than the method's default or fewer than 1000
evaluation epochs is labelled "reduced" wherever it is shown. `--quick` is a CPU smoke run on
the embedded MNIST subset that writes `..._quick.json`, which RESULTS.md never shows.

Accuracies are percentages of the test set. Published numbers are those of
shared/reference/methods.md §13 (and the sections it cites), each with its source tag.
"""
import argparse
import datetime
import glob
import json
import os
import re
import shutil
import sys
import time

import torch

import condense_engine as ce
from bench import common
from condense_engine.checkpoint import load_checkpoint, require_writable_folder
from condense_engine.cli import parse_option
from condense_engine.driver import run_config, run_differences
from condense_engine.expert import load_experts
from condense_engine.methods import get_method
from condense_engine.methods.augment import dc_eval_strategy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_ROOT = os.path.join(REPO_ROOT, "..", "shared", "data")
FULL_EPOCHS = 1000  # the published evaluation's epochs with augmentation (DSA or DC's)
PLAIN_EPOCHS = 300  # and without (DC's numbers outside MNIST)
CHECKPOINT_EVERY = 250  # --save-dir: iterations between checkpoints
# --quick: IPC 1, a few iterations and epochs, and every 10th test image (CPU test time is mostly
# the ConvNet forward over the test set).
QUICK = dict(dataset="default", ipcs=[1], iterations=2, epochs=4, repeats=1, test_stride=10,
             options=dict(batch_real=16))

# Published ConvNet-3 accuracies, % (methods.md §13); "U" in a source = unverified there.
# method → (source tag, data set → {ipc: (mean, std or None)}).
PUBLISHED = {
    "random": ("methods.md §3 coreset rows, 2nd: DANCE T1; MNIST U (from memory)", {
        "mnist": {1: (64.9, 3.5), 10: (95.1, 0.9), 50: (97.9, 0.2)},
        "fashion-mnist": {1: (51.4, 3.8), 10: (73.8, 0.7), 50: (82.5, 0.7)},
        "cifar10": {1: (14.4, 2.0), 10: (26.0, 1.2), 50: (43.4, 1.0)},
        "cifar100": {1: (4.2, 0.3), 10: (14.6, 0.5), 50: (30.0, 0.4)},
        "tinyimagenet": {1: (1.4, 0.1), 10: (5.0, 0.2), 50: (15.0, 0.4)}}),
    "dc": ("methods.md §3, 2nd: KIP table, DANCE T1; MNIST IPC50 std U", {
        "mnist": {1: (91.7, 0.5), 10: (97.4, 0.2), 50: (98.8, None)},
        "fashion-mnist": {1: (70.5, 0.6), 10: (82.3, 0.4), 50: (83.6, 0.4)},
        "cifar10": {1: (28.3, 0.5), 10: (44.9, 0.5), 50: (53.9, 0.5)},
        "cifar100": {1: (12.8, 0.3), 10: (25.2, 0.3)},
        "tinyimagenet": {1: (5.3, 0.1), 10: (12.9, 0.1)}}),
    "dd": ("methods.md §2: CIFAR-10 via AutoPalette table (2nd); MNIST unverified (U)", {
        "mnist": {10: (79.5, 8.1)},
        "cifar10": {10: (36.8, 1.2)}}),
    "dsa": ("methods.md §4, 2nd: KIP table, DATM T1, DANCE T1", {
        "mnist": {1: (88.7, 0.6), 10: (97.8, 0.1), 50: (99.2, 0.1)},
        "fashion-mnist": {1: (70.6, 0.6), 10: (84.6, 0.3), 50: (88.7, 0.2)},
        "cifar10": {1: (28.8, 0.7), 10: (52.1, 0.5), 50: (60.6, 0.5)},
        "cifar100": {1: (13.9, 0.3), 10: (32.3, 0.3), 50: (42.8, 0.4)},
        "tinyimagenet": {1: (5.7, 0.1), 10: (16.3, 0.2)}}),
    "dm": ("methods.md §5, 2nd: DATM T1, DANCE T1; FashionMNIST via DANCE T1 only", {
        "fashion-mnist": {1: (70.7, 0.6), 10: (83.5, 0.3), 50: (88.1, 0.6)},
        "cifar10": {1: (26.0, 0.8), 10: (48.9, 0.6), 50: (63.0, 0.4)},
        "cifar100": {1: (11.4, 0.3), 10: (29.7, 0.3), 50: (43.6, 0.4)},
        "tinyimagenet": {1: (3.9, 0.2), 10: (12.9, 0.4), 50: (24.1, 0.3)}}),
    "idm": ("methods.md §12.4, 2nd: DANCE T1", {
        "cifar10": {1: (45.6, 0.7), 10: (58.6, 0.1), 50: (67.5, 0.1)},
        "cifar100": {1: (20.1, 0.3), 10: (45.1, 0.1), 50: (50.0, 0.2)},
        "tinyimagenet": {1: (10.1, 0.2), 10: (21.9, 0.2), 50: (27.7, 0.3)}}),
    "mtt": ("methods.md §6.4, 2nd: AutoPalette table, DATM T1", {
        "cifar10": {1: (46.3, 0.8), 10: (65.3, 0.7), 50: (71.6, 0.2)},
        "cifar100": {1: (24.3, 0.3), 10: (40.1, 0.4), 50: (47.7, 0.2)},
        "tinyimagenet": {1: (8.8, 0.3), 10: (23.2, 0.2), 50: (28.0, 0.3)}}),
    "tesla": ("methods.md §7, 2nd: DATM T1", {
        "cifar10": {1: (48.5, 0.8), 10: (66.4, 0.8), 50: (72.6, 0.7)},
        "cifar100": {1: (24.8, 0.4), 10: (41.7, 0.3), 50: (47.9, 0.3)}}),
    "datm": ("methods.md §8.4, 2nd: DATM repo figures/comparison.png = paper T1", {
        "cifar10": {1: (46.9, 0.5), 10: (66.8, 0.2), 50: (76.1, 0.3)},
        "cifar100": {1: (27.9, 0.2), 10: (47.2, 0.4), 50: (55.0, 0.2)},
        "tinyimagenet": {1: (17.1, 0.3), 10: (31.1, 0.3), 50: (39.7, 0.3)}}),
    "idc": ("methods.md §9.5 and §13, README; std via DANCE T1", {
        "mnist": {1: (94.2, None), 10: (98.4, None), 50: (99.1, None)},
        "fashion-mnist": {1: (81.0, 0.2), 10: (86.0, 0.3), 50: (86.2, 0.2)},
        "cifar10": {1: (50.6, 0.4), 10: (67.5, 0.5), 50: (74.5, 0.1)},
        "cifar100": {10: (45.1, 0.4)}}),
    "dance": ("methods.md §12.5, README = paper T1", {
        "fashion-mnist": {1: (81.5, 0.4), 10: (86.3, 0.2), 50: (86.9, 0.1)},
        "cifar10": {1: (47.1, 0.2), 10: (70.8, 0.2), 50: (76.1, 0.1)},
        "cifar100": {1: (27.9, 0.2), 10: (49.8, 0.1), 50: (52.8, 0.1)},
        "tinyimagenet": {1: (11.6, 0.2), 10: (26.4, 0.3), 50: (28.9, 0.4)}}),
}
# M3D (= ECHO) published tables could not be verified (methods.md §12.3): none are shown.
UNPUBLISHED = {"m3d": "no verified published table (methods.md §12.3)",
               "echo": "no verified published table (methods.md §12.3)",
               "dq": "no small-IPC table (methods.md §10.3: DQ reports keep ratios of 2-80%)"}
FULL_DATA = {"mnist": "99.6 (U)", "fashion-mnist": "93.5±0.1", "cifar10": "84.8±0.1",
             "cifar100": "56.2±0.3", "tinyimagenet": "37.6±0.4"}

# How each published number was evaluated (methods.md §1.6 and the method sections).
PUBLISHED_RECIPES = {
    "random": "random real subset evaluated like DC/DSA: ConvNet-3, SGD lr 0.01",
    "dc": "ConvNet-3, SGD lr 0.01; MNIST 1000 epochs with DC's augmentation (crop/scale/rotate), elsewhere 300 "
          "epochs without augmentation; 5 sets × 20 models",
    "dd": "random-init DD as quoted by DC: LeNet/AlexCifarNet trained with the learned step schedule, "
          "not the DC protocol",
    "dsa": "ConvNet-3, SGD lr 0.01, 1000 epochs with DSA, batch 256, 5 sets × 20 models",
    "dm": "ConvNet-3, SGD lr 0.01, 1000 epochs with DSA, batch 256, 5 sets × 20 models "
          "(README commands: 5 × 5)",
    "idm": "ConvNet-3 as quoted by DANCE T1 (IDM's own evaluation, methods.md §12.4)",
    "mtt": "ConvNet-3, learned lr, 1000 epochs DSA, 5 models; best evaluation during distillation",
    "tesla": "ConvNet-3, learned lr, 1000 epochs DSA; soft labels on CIFAR-100",
    "datm": "ConvNet-3, learned lr and soft labels, 1000 epochs DSA, batch 128",
    "idc": "multi-formation, CutMix, batch 64, multistep lr: not like-for-like with DC/DSA/DM",
    "dance": "IDC-style evaluation, multi-formation factor 2: not like-for-like with DC/DSA/DM",
}
# The evaluation each method's published numbers used, where it is not the standard one.
EVAL_RECIPES = {"idc": "idc", "dd": "dd"}
# The published expert buffers, (experts, epochs each): MTT's and TESLA's (methods.md §6.1), DATM's (§8.1).
PUBLISHED_BUFFERS = {"mtt": (100, 50), "tesla": (100, 50), "datm": (100, 100)}


def published_augmentation(method: str, dataset: str) -> dict:
    """evaluate()'s augmentation arguments for the augmentation `method`'s published numbers were
    evaluated with: DC's own (methods.md §1.5: MNIST only, none elsewhere) for DC, DSA otherwise."""
    if method != "dc":
        return {}
    return dict(dsa=False, dc_augment=dc_eval_strategy(dataset))


def published_epochs(augmentation: dict) -> int:
    """Evaluation epochs of the published protocol for an augmentation choice (methods.md §1.6):
    PLAIN_EPOCHS when it trains without augmentation (DC outside MNIST), else FULL_EPOCHS."""
    return PLAIN_EPOCHS if augmentation.get("dsa") is False and not augmentation.get("dc_augment") else FULL_EPOCHS


def augmentation_text(recipe: dict) -> str:
    """How an evaluation augmented its training images: 'DSA <strategy>', 'DC <strategy>' or 'no augmentation'."""
    if recipe.get("dsa_strategy"):
        return f"DSA {recipe['dsa_strategy']}"
    return f"DC {recipe['dc_augment']}" if recipe.get("dc_augment") else "no augmentation"


def like_published(row: dict) -> bool:
    """Whether `row` was evaluated with the recipe and augmentation its method's published
    numbers used (EVAL_RECIPES, published_augmentation). Rows written before DC's own
    augmentation existed have no dc_augment key: they count as evaluated with DSA or with none."""
    wanted = published_augmentation(row["method"], row["dataset"])
    recipe = row["recipe"]
    if recipe.get("recipe", "dc") != EVAL_RECIPES.get(row["method"], "dc"):
        return False  # e.g. IDC or DD put under the standard recipe by --dsa-eval
    if recipe.get("recipe") == "dd":  # DD's replay of its learned steps never augments
        return True
    if "dsa" not in wanted:
        return bool(recipe.get("dsa_strategy"))
    return not recipe.get("dsa_strategy") and recipe.get("dc_augment") == wanted["dc_augment"]


# Method options recorded in every row (those whose defaults are ours, not published ones).
# Keyed by the registered name (synset.meta["method"]), so aliases such as "echo" share it.
REPORTED_OPTIONS = {"m3d": ("kernel", "factor", "normalize", "lr_img", "model_steps")}
#: M3D kernels whose `degree` option changes the loss, so their rows report it too.
DEGREE_KERNELS = ("poly", "moments")
#: Method options that choose another algorithm rather than another schedule (M3D's kernel):
#: the at-a-glance table shows a method as its defaults run it whenever such a row exists.
VARIANT_OPTIONS = {"m3d": ("kernel",)}


def default_variant(row: dict) -> bool:
    """Whether `row` ran its method's own algorithm (VARIANT_OPTIONS at their defaults)."""
    keys = VARIANT_OPTIONS.get(row["method"], ())
    if not keys:
        return True
    defaults, own = get_method(row["method"]).defaults, row.get("method_options") or {}
    return all(own.get(key, defaults[key]) == defaults[key] for key in keys)


def reported_options(meta: dict) -> dict:
    """The options of a distilled set (its meta) that its accuracy row records."""
    options = meta["options"]
    reported = {key: options[key] for key in REPORTED_OPTIONS.get(meta["method"], ())}
    if reported.get("kernel") in DEGREE_KERNELS:
        reported["degree"] = options["degree"]
    return reported
TABLE_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "tinyimagenet")


def published(method: str, dataset: str, ipc: int) -> tuple[float, float | None] | None:
    """The published (mean, std) of a method on a data set at an IPC, if methods.md has one."""
    return PUBLISHED.get(method, ("", {}))[1].get(dataset, {}).get(ipc)


def format_published(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:.1f}" if std is None else f"{mean:.1f}±{std:.1f}"


def buffer_change(method: str, buffer) -> tuple[str, str] | None:
    """(ours, published) of an expert buffer smaller than the published one, None otherwise:
    a trajectory-matching number depends on how many experts it matched and how long they trained."""
    experts, epochs = len(buffer), buffer.num_epochs
    published_experts, published_epochs = PUBLISHED_BUFFERS.get(method, (0, 0))
    if experts >= published_experts and epochs >= published_epochs:
        return None
    return (f"{experts} expert{'s' if experts != 1 else ''} × {epochs} epoch{'s' if epochs != 1 else ''}",
            f"{published_experts} × {published_epochs}")


def buffer_summary(buffer) -> dict:
    """What an accuracy row records about the expert buffer a run matched."""
    meta = buffer.meta
    return dict(experts=len(buffer), epochs=buffer.num_epochs, model=meta["model"], optimizer=meta["optimizer"],
                lr=meta["lr"], augmentation=meta["augmentation"], zca=meta["zca"], seed=meta["seed"])


def schedule_label(iterations: int, default_iterations: int, epochs: int, changed: dict | None = None,
                   full_epochs: int = FULL_EPOCHS) -> str:
    """'published schedule' or 'REDUCED (...)' naming every shortened or changed part of the run.

    `changed` maps a method option set away from its published default to (value, default);
    `full_epochs` is the published evaluation's (published_epochs)."""
    shortened = [f"{key} {value} instead of {default}" for key, (value, default) in (changed or {}).items()]
    if iterations < default_iterations:
        shortened.append(f"{iterations} of {default_iterations} distillation iterations")
    if epochs < full_epochs:
        shortened.append(f"{epochs} of {full_epochs} evaluation epochs")
    return f"REDUCED ({'; '.join(shortened)})" if shortened else "published schedule"


def recipe_text(recipe: dict) -> str:
    """One line describing how our number was evaluated."""
    if recipe.get("recipe") == "dd":
        return (f"{recipe['model']}, DD's replay: {recipe['schedule']}, mean step size {recipe['lr']:.3g}, "
                f"no augmentation, 1 set × {recipe['repeats']} model{'s' if recipe['repeats'] != 1 else ''}")
    return (f"{recipe['model']}, SGD lr {recipe['lr']:g}, {recipe['epochs']} epochs, "
            f"batch {recipe['batch_size']}, {augmentation_text(recipe)}, 1 set × {recipe['repeats']} "
            f"model{'s' if recipe['repeats'] != 1 else ''}")


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: 'cpu', or the GPU's name in lower case with dashes."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", common.device_name(device).lower()).strip("-")


def default_out_path(device: torch.device, quick: bool, results_dir: str = common.RESULTS_DIR) -> str:
    """bench/results/accuracy-<device>-<UTC date and time>[-<k>][_quick].json, one file per run.

    The name is reserved by creating the file exclusively, so runs started in the same second
    (one per data set, say) never overwrite each other's rows."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    suffix = "_quick" if quick else ""
    os.makedirs(results_dir, exist_ok=True)
    for attempt in range(1000):
        tag = f"-{attempt}" if attempt else ""
        path = os.path.join(results_dir, f"accuracy-{device_slug(device)}-{stamp}{tag}{suffix}.json")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free results file name for stamp {stamp} in {results_dir}")


def cell_folder(save_dir: str, method: str, dataset: str, ipc: int, iterations: int, seed: int) -> str:
    """Where `--save-dir` keeps one cell's checkpoint, log and finished set."""
    return os.path.join(save_dir, f"{method}-{dataset}-ipc{ipc}-it{iterations}-seed{seed}")


def shorter_cell(folder: str, iterations: int, config: dict) -> tuple[str, int] | None:
    """The folder beside `folder` of the same cell with the most iterations below `iterations`
    whose checkpoint belongs to `config` up to the iteration count, and that count; None if
    there is none. Its last state is where a longer run of the same cell passes (no method's
    step reads the total), so the longer run can start there."""
    head, tail = re.match(r"(.*-it)\d+(-seed\d+)$", folder).groups()
    best = None
    for candidate in glob.glob(glob.escape(head) + "*" + glob.escape(tail)):
        match = re.fullmatch(re.escape(head) + r"(\d+)" + re.escape(tail), candidate)
        checkpoint = os.path.join(candidate, "checkpoint.pt")
        if not match or int(match.group(1)) >= iterations or not os.path.exists(checkpoint):
            continue
        state = load_checkpoint(checkpoint)
        if not run_differences(state["config"], config) and (best is None or state["iteration"] > best[1]):
            best = (candidate, state["iteration"])
    return best


#: What a cell's saved set carries into its row, also when the set is reused.
RUN_META = ("extended_from", "unlogged_iterations")


def distill_cell(train, method: str, ipc: int, iterations: int, device: torch.device, seed: int, options: dict,
                 folder: str | None) -> tuple[ce.SyntheticSet, dict]:
    """Distil one cell; with `folder`, resumably: a finished set there is reused, a checkpoint
    there is continued (it is written every CHECKPOINT_EVERY iterations and on SIGTERM), a new
    cell starts from the last state of the same cell run with fewer iterations (`shorter_cell`;
    its checkpoint and log are copied, and its seconds count), and the finished set is saved.
    Returns the set and what to record about the run (seconds, resumes, extension)."""
    def run(**resumable) -> ce.SyntheticSet:
        return ce.distill(train, method=method, ipc=ipc, iterations=iterations, device=device, seed=seed,
                          progress=False, **resumable, **options)

    if folder is None:
        start = time.perf_counter()
        return run(), dict(seconds=time.perf_counter() - start)
    finished, checkpoint = os.path.join(folder, "synset.pt"), os.path.join(folder, "checkpoint.pt")
    log, extension = os.path.join(folder, "log.jsonl"), os.path.join(folder, "extended_from.json")
    algorithm = get_method(method)(train.name, ipc, **options)
    expected = algorithm.options | dict(iterations=iterations)
    if os.path.exists(finished):
        synset = ce.SyntheticSet.load(finished)
        if synset.meta.get("options") != expected or synset.meta.get("seed") != seed:
            raise ValueError(f"{finished} was distilled with other options or seed: it has "
                             f"{synset.meta.get('options')} (seed {synset.meta.get('seed')}), this run asks for "
                             f"{expected} (seed {seed}); remove it or pick another --save-dir")
        kept = {key: synset.meta[key] for key in RUN_META if key in synset.meta}
        return synset, dict(seconds=synset.meta["run_seconds"], reused=finished, **kept)
    if not os.path.exists(checkpoint):
        algorithm.options = expected
        config = run_config(algorithm, train, ipc, seed)
        shorter = shorter_cell(folder, iterations, config)
        if shorter:
            os.makedirs(folder, exist_ok=True)
            for name in ("log.jsonl", "checkpoint.pt"):  # the checkpoint last: it marks the copy complete
                shutil.copyfile(os.path.join(shorter[0], name), os.path.join(folder, name) + ".part")
                os.replace(os.path.join(folder, name) + ".part", os.path.join(folder, name))
            with open(extension, "w") as out:
                json.dump(dict(folder=shorter[0], iteration=shorter[1]), out)
    os.makedirs(folder, exist_ok=True)
    extended = json.load(open(extension)) if os.path.exists(extension) else None
    resumed_from = load_checkpoint(checkpoint)["iteration"] if os.path.exists(checkpoint) else 0
    seconds, unlogged = 0.0, 0
    if resumed_from and os.path.exists(log):
        seconds = earlier_seconds(log, resumed_from)
    elif resumed_from:  # e.g. the folder was cleared while a stopped run still wrote its checkpoint
        unlogged = resumed_from
        print(f"{log} is missing: the seconds recorded leave out the {unlogged} iterations before the checkpoint",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    synset = run(checkpoint=checkpoint, checkpoint_every=CHECKPOINT_EVERY, resume=True, log=log)
    seconds += time.perf_counter() - start
    synset.meta["run_seconds"] = seconds
    kept = {key: value for key, value in zip(RUN_META, (extended, unlogged)) if value}
    synset.meta.update(kept)
    synset.save(finished)
    return synset, dict(seconds=seconds, **({"resumed_from": resumed_from} if resumed_from else {}), **kept)


def earlier_seconds(log: str, resumed_from: int) -> float:
    """Distillation seconds that the processes before a resume from iteration `resumed_from`
    spent on the iterations kept. Each process logs seconds since its own start, so a record
    whose iteration or seconds go back starts the next process's segment; a segment counts up
    to the iteration before the next one starts (the last one up to `resumed_from`), not the
    iterations after its last checkpoint that were done again (logs written before the driver
    dropped those records on a resume still hold them)."""
    segments, previous = [], None
    with open(log) as lines:
        for line in lines:
            record = json.loads(line)
            if (previous is None or record["iteration"] <= previous["iteration"]
                    or record["seconds"] < previous["seconds"]):
                segments.append({})
            segments[-1][record["iteration"]] = record["seconds"]
            previous = record
    ends = [min(later) - 1 for later in segments[1:]] + [resumed_from]
    return sum(max((s for i, s in segment.items() if i <= end), default=0.0) for segment, end in zip(segments, ends))


def full_data_accuracy(dataset: str) -> float | None:
    """The published full-data accuracy of `dataset` as a fraction (FULL_DATA), None if unknown."""
    text = FULL_DATA.get(dataset)
    return float(re.match(r"[\d.]+", text).group()) / 100 if text else None


def measure(method: str, dataset: str, train, test, ipc: int, *, iterations: int | None, epochs: int | None,
            repeats: int, device: torch.device, seed: int, options: dict, baseline: bool = True,
            save_dir: str | None = None, fair: bool = False, dsa_eval: bool = False) -> dict:
    """Distil one set and evaluate it (with the random-real baseline unless `baseline` is
    False, e.g. when another row of the same data set and schedule has it); one result row.
    With `save_dir`, the cell can be stopped and resumed and its set is kept (see distill_cell).
    `fair` adds DD-Ranking's LRS and ARS (`ce.fair_scores`, full-data accuracy from FULL_DATA, or
    measured for `epochs` where the data set has none), which needs the baseline.
    The evaluation is the method's published one (EVAL_RECIPES, published_augmentation), or the
    standard recipe with DSA for every method when `dsa_eval`; `epochs` None is that protocol's
    (published_epochs), and the dd recipe (DD's replay of its learned steps) has none."""
    if fair and not baseline:
        raise ValueError("fair scores compare with the random-real baseline: drop --no-baseline")
    augmentation = {} if dsa_eval else published_augmentation(method, train.name)
    recipe = "dc" if dsa_eval else EVAL_RECIPES.get(method, "dc")
    if fair and (augmentation or recipe == "dd"):
        evaluated = "DD's replay of its learned steps" if recipe == "dd" else augmentation_text(augmentation)
        raise ValueError(f"fair scores start from the DSA evaluation, but {method} is evaluated with "
                         f"{evaluated} as published: add --dsa-eval")
    full_epochs = published_epochs(augmentation)
    epochs = full_epochs if epochs is None or recipe == "dd" else epochs
    published = get_method(method)(train.name, ipc).options
    buffer = load_experts(options["buffer"]) if options.get("buffer") else None
    smaller_buffer = buffer_change(method, buffer) if buffer is not None else None
    changed = {"expert buffer": smaller_buffer} if smaller_buffer else {}
    changed.update((key, (value, published[key])) for key, value in options.items()  # the path tells nothing
                   if published.get(key) != value and key != "buffer")
    default_iterations = published["iterations"]
    iterations = default_iterations if iterations is None else iterations
    folder = cell_folder(save_dir, method, dataset, ipc, iterations, seed) if save_dir else None
    synset, run = distill_cell(train, method, ipc, iterations, device, seed, options, folder)
    method_options = reported_options(synset.meta)
    start = time.perf_counter()
    # model None: evaluate's own choice, the ConvNet, or for DD's replay the student its steps were learned for.
    evaluation = dict(model=None, repeats=repeats, epochs=epochs, seed=seed, device=device, recipe=recipe,
                      checkpoint=os.path.join(folder, "evaluation-runs.pt") if folder else None)
    report = ce.evaluate(synset, test, baseline=baseline, train_set=train, **evaluation, **augmentation)
    scores = None
    if fair:
        full = full_data_accuracy(dataset)
        scores = ce.fair_scores(synset, test, train, full_accuracy=full, full_epochs=epochs, report=report,
                                **evaluation)
        scores = dict(lrs=100 * scores.lrs, ars=100 * scores.ars, hlr=100 * scores.hlr, ior=100 * scores.ior,
                      accuracies={k: 100 * v for k, v in scores.accuracies.items()},
                      full_data="published (FULL_DATA)" if full is not None else f"measured, {epochs} epochs")
    return dict(method=method, dataset=dataset, ipc=ipc, acc_mean=100 * report.mean,
                acc_std=100 * report.std, repeats=repeats, iterations=iterations, seconds=run.pop("seconds"), **run,
                device=common.device_name(device),
                baseline_random=dict(mean=100 * report.baseline.mean, std=100 * report.baseline.std)
                if baseline else None,
                recipe=report.recipe, test_images=len(test), method_options=method_options,
                schedule=schedule_label(iterations, default_iterations, epochs, changed, full_epochs),
                default_iterations=default_iterations, options=options,
                **({"expert_buffer": buffer_summary(buffer)} if buffer is not None else {}),
                eval_seconds=time.perf_counter() - start, **({"fair": scores} if scores else {}))


def accuracy_section(files: list[tuple[str, dict]]) -> str:
    """The RESULTS.md accuracy section: our rows beside the published numbers, then the
    published reference table (methods.md §13)."""
    parts = ["## Accuracy (ConvNet, test accuracy %, mean ± std)", ""]
    rows = [(stem, row) for stem, data in files for row in data["rows"]]
    if not rows:
        parts += ["No accuracy runs recorded yet: run `python -m bench.accuracy` (see its --help).", ""]
    else:
        parts += ["Ours: 1 synthetic set per cell, std over fresh evaluation models. Runs marked "
                  "REDUCED used a shorter schedule than published and are not the published "
                  "protocol.", "",
                  "LRS / ARS: DD-Ranking's label- and augmentation-robust scores (0-100; `--fair`), "
                  "against the published full-data accuracy.", ""]
        parts += at_a_glance(rows)
        parts += ["### Every run", "",
                  "| method | data set | IPC | seed | ours | random real (ours) | LRS / ARS | schedule | distill s "
                  "| our recipe | published | published random | published recipe [source] | file |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for stem, row in rows:
            method, dataset, ipc = row["method"], row["dataset"], row["ipc"]
            base = row.get("baseline_random") or {}
            base_text = f"{base['mean']:.1f}±{base['std']:.1f}" if base else "–"
            reference = published(method, dataset, ipc)
            if method in PUBLISHED:
                published_recipe = f"{PUBLISHED_RECIPES[method]} (source: {PUBLISHED[method][0]})"
            else:
                published_recipe = UNPUBLISHED.get(method, "not in methods.md")
            fair = row.get("fair")
            fair_text = f"{fair['lrs']:.1f} / {fair['ars']:.1f}" if fair else "–"
            cells = [method, dataset, str(ipc), str(row["recipe"].get("seed", "–")),
                     f"{row['acc_mean']:.1f}±{row['acc_std']:.1f}", base_text, fair_text, schedule_text(row),
                     f"{row['seconds']:.0f}", recipe_text(row["recipe"]), format_published(reference),
                     published_random_text(row), published_recipe, f"`{stem}.json`"]
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
        parts += method_comparison(rows, "dm", "m3d")
        parts += iteration_curves(rows)
    parts += published_reference_table()
    return "\n".join(parts)


def published_random_text(row: dict) -> str:
    """The published random-real accuracy of the row's cell, which the DC protocol measured: none
    beside a replay row, whose baseline trains by the set's learned steps."""
    if row["recipe"].get("recipe") == "dd":
        return "– (DD's replay)"
    return format_published(published("random", row["dataset"], row["ipc"]))


def current_full_evaluation(row: dict) -> bool:
    """Whether a row was evaluated for its published epochs (published_epochs) and is not
    superseded: the rows the summary tables are built from."""
    full_epochs = published_epochs(published_augmentation(row["method"], row["dataset"]))
    replayed = row["recipe"].get("recipe") == "dd"  # DD's evaluation is its learned steps, not epochs
    return (replayed or row["recipe"]["epochs"] >= full_epochs) and "superseded" not in (row.get("note") or "")


def at_a_glance(rows: list[tuple[str, dict]]) -> list[str]:
    """One line per method, data set and IPC: of its rows evaluated for the published epochs
    (published_epochs; superseded ones left out), the one with the most distillation iterations
    (the newest file among equals), preferring rows evaluated with the published augmentation
    (like_published), then rows of the method's own algorithm (default_variant), beside the
    published number and how far it is from it."""
    chosen = {}
    for stem, row in sorted(rows, key=lambda item: item[0]):
        if not current_full_evaluation(row):
            continue
        key = (row["method"], row["dataset"], row["ipc"])
        rank = (like_published(row), default_variant(row), row["iterations"])
        if key not in chosen or rank >= (like_published(chosen[key][1]), default_variant(chosen[key][1]),
                                         chosen[key][1]["iterations"]):
            chosen[key] = (stem, row)
    if not chosen:
        return []
    order = {name: index for index, name in enumerate(TABLE_DATASETS)}
    lines = [f"### At a glance: the longest run of each cell evaluated for the published {FULL_EPOCHS} epochs "
             f"({PLAIN_EPOCHS} where the published evaluation did not augment)", "",
             "| data set | IPC | method | ours | published | ours − published | random real (ours / published) "
             "| schedule | file |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (method, dataset, ipc), (stem, row) in sorted(
            chosen.items(), key=lambda item: (order.get(item[0][1], len(order)), item[0][1], item[0][2], item[0][0])):
        reference = published(method, dataset, ipc)
        gap = "–"
        if reference is not None:
            difference, std = row["acc_mean"] - reference[0], reference[1]
            standing = ("at or above" if difference >= 0 else "" if std is None
                        else "within one published std" if difference >= -std else "below")
            notes = [standing] if standing else []
            if not like_published(row):
                notes.append(f"not like-for-like: evaluated with {augmentation_text(row['recipe'])}")
            gap = f"{difference:+.2f}" + (f" ({'; '.join(notes)})" if notes else "")
        base = row.get("baseline_random")
        random_text = (f"{base['mean']:.1f}" if base else "–") + " / " + published_random_text(row)
        lines.append(f"| {dataset} | {ipc} | {method} | {row['acc_mean']:.2f}±{row['acc_std']:.2f} | "
                     f"{format_published(reference)} | {gap} | {random_text} | {schedule_text(row)} | `{stem}.json` |")
    return lines + [""]


#: Recipe fields that say how an evaluation ran, not what it trained: left out of comparisons.
_EXECUTION_FIELDS = ("path", "loop_reason")


def _same_recipe_key(row: dict, baseline: str) -> tuple:
    """What must match for two rows to be compared: data set, IPC, distillation iterations, the
    --set overrides other than the method's own options (e.g. M3D's factor; an option the
    `baseline` method also has, such as lr_img, is not the method's own), and the evaluation
    recipe (how it was executed aside; rows from before the recipe or DC's augmentation was
    recorded used "dc" and no DC augmentation)."""
    recipe = {key: value for key, value in row["recipe"].items() if key not in _EXECUTION_FIELDS}
    recipe.setdefault("recipe", "dc")
    recipe.setdefault("dc_augment", None)
    own = set(row.get("method_options") or {}) - set(get_method(baseline).defaults)
    shared = {key: value for key, value in (row.get("options") or {}).items() if key not in own}
    return (row["dataset"], row["ipc"], row["iterations"], json.dumps(shared, sort_keys=True),
            json.dumps(recipe, sort_keys=True))


def _own_options_text(row: dict) -> str:
    """A row's method options (e.g. M3D's kernel, factor and lr_img) as k=v, or '–'."""
    own = row.get("method_options") or {}
    return ", ".join(f"{key}={value}" for key, value in sorted(own.items())) or "–"


def method_comparison(rows: list[tuple[str, dict]], baseline: str, method: str) -> list[str]:
    """`method`, one line per setting of its options, against `baseline` on every cell both ran
    under the same recipe, options both methods have set alike (the newest row of each, superseded
    rows left out): the difference and whether it exceeds the two stds."""
    newest = {}
    for stem, row in sorted(rows, key=lambda item: item[0]):
        if row["method"] in (baseline, method) and "superseded" not in (row.get("note") or ""):
            own = _own_options_text(row) if row["method"] == method else None
            newest[(row["method"], _same_recipe_key(row, baseline), own)] = (stem, row)
    lines = [f"### {method.upper()} against {baseline.upper()} under the same recipe", "",
             "Same data set, IPC, iterations, options and evaluation recipe; one line per setting of "
             f"{method.upper()}'s options; a difference larger than the two stds together is called "
             "ahead or behind, a smaller one a tie.", "",
             f"| data set | IPC | {baseline} | {method} | {method} − {baseline} | verdict | {method} options "
             "| schedule | files |",
             "|---|---|---|---|---|---|---|---|---|"]
    pairs = [(key, own, newest[(baseline, key, None)], found) for (name, key, own), found in newest.items()
             if name == method and (baseline, key, None) in newest]
    if not pairs:
        return []
    for key, own, (base_stem, base), (stem, row) in sorted(pairs, key=lambda pair: (pair[0][:3], pair[1])):
        difference = row["acc_mean"] - base["acc_mean"]
        margin = row["acc_std"] + base["acc_std"]
        verdict = "ahead" if difference > margin else "behind" if difference < -margin else "tie"
        files = f"`{base_stem}.json`" + ("" if stem == base_stem else f", `{stem}.json`")
        lines.append(f"| {row['dataset']} | {row['ipc']} | {base['acc_mean']:.2f}±{base['acc_std']:.2f} | "
                     f"{row['acc_mean']:.2f}±{row['acc_std']:.2f} | {difference:+.2f} | {verdict} | {own} | "
                     f"{base.get('schedule', '–')} | {files} |")
    return lines + [""]


#: Recipe fields that differ between runs of one cell: the seed is part of the cell, and the
#: evaluation lr of a learned-lr method (MTT, TESLA, DATM) is the set's own.
_RUN_FIELDS = _EXECUTION_FIELDS + ("lr", "seed")


def iteration_curves(rows: list[tuple[str, dict]]) -> list[str]:
    """One line per cell (method, data set, IPC, seed, options, evaluation recipe) evaluated for
    the published epochs after two or more distillation lengths (superseded rows left out): the
    accuracy at each length and the best of them. Trajectory matching publishes that best, which
    picks a length on the test set; the at-a-glance table shows the longest."""
    curves = {}
    for stem, row in sorted(rows, key=lambda item: item[0]):
        if not current_full_evaluation(row):
            continue
        recipe = {key: value for key, value in row["recipe"].items() if key not in _RUN_FIELDS}
        key = (row["method"], row["dataset"], row["ipc"], row["recipe"].get("seed"),
               json.dumps(row.get("options") or {}, sort_keys=True), json.dumps(recipe, sort_keys=True))
        curves.setdefault(key, {})[row["iterations"]] = (stem, row)  # the newest file of each length
    curves = {key: runs for key, runs in curves.items() if len(runs) > 1}
    if not curves:
        return []
    order = {name: index for index, name in enumerate(TABLE_DATASETS)}
    lines = ["### One cell after several distillation lengths", "",
             "The same method, data set, IPC, seed, options and evaluation recipe, evaluated after each "
             "length that was run. The best picks the length on the test set, as MTT, TESLA and DATM "
             "report (their published numbers are the best evaluation during distillation).", "",
             "| data set | IPC | method | seed | accuracy after N iterations | best | files |",
             "|---|---|---|---|---|---|---|"]
    for (method, dataset, ipc, seed, _, _), runs in sorted(
            curves.items(), key=lambda item: (order.get(item[0][1], len(order)), item[0][1], item[0][2],
                                              item[0][0], str(item[0][3]))):
        lengths = sorted(runs)
        curve = ", ".join(f"{n}: {runs[n][1]['acc_mean']:.2f}±{runs[n][1]['acc_std']:.2f}" for n in lengths)
        best = max(lengths, key=lambda n: runs[n][1]["acc_mean"])
        files = ", ".join(f"`{runs[n][0]}.json`" for n in lengths)
        lines.append(f"| {dataset} | {ipc} | {method} | {seed} | {curve} | {runs[best][1]['acc_mean']:.2f} "
                     f"(after {best}) | {files} |")
    return lines + [""]


def schedule_text(row: dict) -> str:
    """The row's schedule label, then its method options that are not the published ones (a
    method's own defaults, e.g. M3D's factor), whether it extends a shorter run of the same cell
    (its seconds include that run's), then its note (e.g. why it was superseded)."""
    text = row.get("schedule", "–")
    if row.get("extended_from"):
        text += f"; continues the {row['extended_from']['iteration']}-iteration run of this cell"
    if row.get("unlogged_iterations"):
        text += f"; distill s leave out its first {row['unlogged_iterations']} iterations (their log was lost)"
    if row.get("method_options"):
        text += "; options " + ", ".join(f"{key}={value}" for key, value in sorted(row["method_options"].items()))
    return text + (f"; **{row['note']}**" if row.get("note") else "")


def published_reference_table() -> list[str]:
    """The published numbers we carry, one row per data set and IPC, with the sources below."""
    methods = list(PUBLISHED)
    lines = ["### Published numbers (methods.md §13; ConvNet-3, ConvNet-4 on TinyImageNet)", "",
             "| data set | IPC | " + " | ".join(methods) + " | full data |",
             "|---|---|" + "---|" * len(methods) + "---|"]
    for dataset in TABLE_DATASETS:
        for ipc in (1, 10, 50):
            cells = [format_published(published(method, dataset, ipc)) for method in methods]
            full = FULL_DATA[dataset] if ipc == 1 else ""
            lines.append(f"| {dataset} | {ipc} | " + " | ".join(cells) + f" | {full} |")
    lines += ["", "Evaluation recipes and sources (2nd = confirmed through another paper's table, "
              "U = unverified in methods.md):", ""]
    lines += [f"- **{method}**: {PUBLISHED_RECIPES[method]} (source: {source})"
              for method, (source, _) in PUBLISHED.items()]
    lines += [f"- **m3d**: {UNPUBLISHED['m3d']}", ""]
    return lines


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["dm", "m3d"])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--ipcs", nargs="+", type=int, default=[1, 10, 50])
    parser.add_argument("--iterations", type=int, default=None,
                        help="distillation iterations (default: each method's published default)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"evaluation epochs (the published protocol's: {FULL_EPOCHS}, {PLAIN_EPOCHS} for DC "
                             "outside MNIST, which it evaluated without augmentation)")
    parser.add_argument("--repeats", type=int, default=5, help="fresh evaluation models per set (5)")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                        help="folder holding one folder per data set (default ../shared/data)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="options", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                        help="method option for every run, e.g. --set batch_real=64 (labels the run REDUCED "
                             "when it shortens the published schedule)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the random-real baseline (saves its evaluation when another run has it)")
    parser.add_argument("--dsa-eval", action="store_true",
                        help="evaluate every method by the standard recipe with DSA (default: the evaluation its "
                             "published numbers used: for DC its own augmentation on MNIST and none elsewhere, "
                             "IDC's recipe for IDC, the replay of the learned steps for DD)")
    parser.add_argument("--fair", action="store_true",
                        help="also DD-Ranking's LRS and ARS per cell (two more evaluations: without DSA)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: embedded MNIST subset, IPC 1, a few iterations and epochs")
    parser.add_argument("--save-dir", help="keep each cell's checkpoint, log, set and finished evaluation runs in a "
                             "folder here, so a stopped run continues where it was (distillation and "
                             "evaluation) and a finished set is evaluated rather than distilled again")
    parser.add_argument("--out", help="results file (default bench/results/accuracy-<device>-<date>.json)")
    parser.add_argument("--results-dir", default=common.RESULTS_DIR, help="folder RESULTS.md is built from")
    parser.add_argument("--report", default=os.path.join(REPO_ROOT, "bench", "RESULTS.md"),
                        help="RESULTS.md to regenerate")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate RESULTS.md")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options, quick_options = dict(args.options), {}
    if args.quick:
        args.datasets, args.ipcs, quick_options = [QUICK["dataset"]], QUICK["ipcs"], QUICK["options"]
        args.iterations, args.epochs, args.repeats = QUICK["iterations"], QUICK["epochs"], QUICK["repeats"]
    out = args.out or default_out_path(device, args.quick)
    # Where the results go is checked before hours of work, not after the first cell.
    require_writable_folder(os.path.dirname(os.path.abspath(out)), "results")
    if args.save_dir:
        require_writable_folder(args.save_dir, "cell folders")
    if not args.no_report:
        require_writable_folder(os.path.dirname(os.path.abspath(args.report)), "the report")
    rows = []
    for dataset in args.datasets:
        root = None if dataset == "default" else os.path.join(args.data_root, dataset)
        train = ce.datasets.load(dataset, root=root, split="train")
        test = ce.datasets.load(dataset, root=root, split="test")
        if args.quick:
            test = test.subset(torch.arange(0, len(test), QUICK["test_stride"]))
        for method in args.methods:
            known = get_method(method).defaults  # quick options only where the method has them (DQ: no batch_real)
            method_options = {k: v for k, v in quick_options.items() if k in known} | options
            for ipc in args.ipcs:
                rows.append(measure(method, dataset, train, test, ipc, iterations=args.iterations,
                                    epochs=args.epochs, repeats=args.repeats, device=device, seed=args.seed,
                                    options=method_options, baseline=not args.no_baseline,
                                    save_dir=args.save_dir, fair=args.fair, dsa_eval=args.dsa_eval))
                row = rows[-1]
                base = f"{row['baseline_random']['mean']:.2f}" if row["baseline_random"] else "–"
                print(f"{method} {dataset} ipc {ipc}: {row['acc_mean']:.2f} ± {row['acc_std']:.2f} % "
                      f"(random real {base}) {row['schedule']}", flush=True)
                common.write_results("accuracy", rows, device, out)
    print(f"wrote {out}")
    if not args.no_report:
        from bench import report  # imported here: report imports this module for its tables

        print(f"wrote {report.write_report(args.results_dir, args.report)}")
    return rows


if __name__ == "__main__":
    main()
