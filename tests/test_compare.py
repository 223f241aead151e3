"""The shortcut-strength comparison end to end on synthetic sources: a tiny grid shared by two
processes, parts measured separately and merged from their cell records, a killed cell rerun,
aggregation with missing and unconverged cells, plots, and bad grids."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from shortcut_study.cli import main
from shortcut_study.compare import CompareOptions, cell_file, load_grid, write_results
from shortcut_study.storage import open_storage

from .conftest import kill_once_training

TINY_GRID = """
name = "tiny"
methods = ["erm", "groupdro+shuffle"]
agreements = [0.1, 0.9]
digit_sizes = [16, 8]
seeds = [0]
preset = "methods"

[recipe.train]
epochs = 1
batch_size = 32
eval_batch_size = 64
tta = "none"

[recipe.build]
train_size = 120
val_size = 40
test_size = 30
"""


def _grid(tmp_path: Path, text: str = TINY_GRID) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def _compare(sources, tmp_path: Path, grid: Path, *extra: str, db: str = "optuna.db") -> list[str]:
    """The command; `sources=None` leaves out --cifar / --mnist."""
    given = [] if sources is None else ["--cifar", str(sources["cifar_tgz"]), "--mnist", str(sources["mnist_tgz"])]
    return [sys.executable, "-m", "shortcut_study.cli", "compare", "--grid", str(grid), *given,
            "--storage", f"sqlite:///{tmp_path}/{db}", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *extra]


def _study(tmp_path: Path, name: str = "tiny", db: str = "optuna.db", seeds: str = "0") -> optuna.Study:
    return optuna.load_study(study_name=f"compare-{name}-seeds-{seeds}",
                             storage=open_storage(f"sqlite:///{tmp_path}/{db}"))


def test_two_processes_share_a_grid_each_cell_once_tracked_aggregated_and_plotted(sources, tmp_path):
    grid = _grid(tmp_path)
    procs = [subprocess.Popen(_compare(sources, tmp_path, grid), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        outs.append(out)
    trials = _study(tmp_path).trials
    cells = [json.dumps(t.params, sort_keys=True) for t in trials]
    assert len(trials) == 8 and len(set(cells)) == 8  # no cell ran twice
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # one dataset per (agreement, digit size), shared by both methods and both processes
    assert len(list((tmp_path / "data").glob("strength-*/metadata.csv"))) == 4
    assert sum("cell " in line and "left" in line for out in outs for line in out.splitlines()) == 8
    # every cell a child run under the comparison's one parent, with its test confusion matrix
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("compare-tiny")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.role = 'comparison'")
    assert len(parents) == 1
    children = client.search_runs([exp.experiment_id], filter_string="tags.role = 'cell'")
    assert len(children) == 8
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all("test_conflicting_acc" in c.data.metrics and "cell.agreement" in c.data.params for c in children)
    assert "test_confusion.png" in {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert {"summary.csv", "summary.md", "conflicting_vs_agreement.png"} <= {
        a.path for a in client.list_artifacts(parents[0].info.run_id)}
    # the tables and plots
    out = tmp_path / "out"
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 8 and (summary["seeds_done"] == 1).all()
    assert summary["acc_mean"].between(0, 100).all()
    for name in ("conflicting_vs_agreement", "gap_vs_agreement", "overall_vs_agreement"):
        assert (out / f"{name}.png").stat().st_size > 1000
    # a finished grid is never rerun
    again = subprocess.run(_compare(sources, tmp_path, grid), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len(_study(tmp_path).trials) == 8
    # nor on another storage: the cell records say what some part finished
    again = subprocess.run(_compare(sources, tmp_path, grid, db="other.db"), cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len(_study(tmp_path, db="other.db").trials) == 0

    # a part measured separately (another seed, another storage, named) merges from the records
    second = subprocess.run(_compare(sources, tmp_path, grid, "--set", "seeds=1", "--part", "second", db="b.db"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    # (aggregating reads the records only: no sources, no storage)
    merged = subprocess.run(_compare(None, tmp_path, grid, "--set", "seeds=0,1", "--aggregate", db="none.db"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 8 and (summary["seeds_done"] == 2).all()
    text = (out / "summary.md").read_text()
    assert "`second` (8 cells" in text and text.count("cells, commit") == 2  # both parts, each with its machine
    assert len(list((tmp_path / "out-cells").glob("*__seed*.json"))) == 16
    # a grid with another recipe is refused for this cell folder, before any storage is touched
    other = subprocess.run(_compare(sources, tmp_path, grid, "--set", "train.epochs=2", db="c.db"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "holds cells of another grid (differs in recipe/train.epochs)" in other.stderr
    assert other.stderr.count("\n") == 1 and not (tmp_path / "c.db").exists()
    # training a cell needs the sources
    unbuilt = subprocess.run(_compare(None, tmp_path, grid, "--set", "seeds=2", db="d.db"), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert unbuilt.returncode == 2 and "give both" in unbuilt.stderr and unbuilt.stderr.count("\n") == 1


def test_killed_cell_is_failed_and_rerun(sources, tmp_path):
    # Enough epochs that a cell is still training when the poll (once a second) looks: a one-epoch
    # cell can start and finish between two looks, and the sweep then ends before it can be killed.
    grid = _grid(tmp_path, TINY_GRID.replace('digit_sizes = [16, 8]', 'digit_sizes = [16]')
                 .replace('agreements = [0.1, 0.9]', 'agreements = [0.9]').replace("epochs = 1", "epochs = 15"))
    cmd = _compare(sources, tmp_path, grid, "--heartbeat", "1", "--grace", "3")
    kill_once_training(cmd, f"sqlite:///{tmp_path}/optuna.db", tmp_path, study="compare-tiny-seeds-0")
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    trials = _study(tmp_path).trials
    complete = [json.dumps(t.params, sort_keys=True) for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and len(set(complete)) == len(complete)  # the killed cell failed; none ran twice
    killed = json.dumps(failed[0].params, sort_keys=True) if failed[0].params else None
    # The killed cell ran again, unless the kill landed after its record was written (a tiny cell
    # can finish in the instant before): then what it finished is kept, not trained again.
    recorded = {p.name for p in (tmp_path / "out-cells").glob("*__seed*.json")}
    assert len(recorded) == 2
    assert len(complete) == 2 or (len(complete) == 1 and killed is not None and killed not in complete)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["compare-tiny"], filter_string="tags.role = 'cell'")
    assert sorted(runs["status"]) == ["FAILED"] + ["FINISHED"] * len(complete)


def _record_cell(out: Path, cell, acc, aligned, conflicting, worst, gap, last=1.0, clipped=0, **extra):
    """A finished cell's record, as a part leaves it, with the given test metrics (and `extra` fields)."""
    from shortcut_study.parts import write_record

    write_record(cell_file(out, cell), {
        **cell.params, "test": {"acc": acc, "aligned_acc": aligned, "conflicting_acc": conflicting,
                                "worst_group_acc": worst, "gap": gap, "cf_gap": gap},
        "seconds": 3.0, "train_seconds": 2.0, "rarest_cell": 4, "train_loss_first": 2.3, "train_loss_last": last,
        "train_loss_max": 2.3, "clipped_steps": clipped, "part": "p1", "machine": "a test machine", "commit": "abc",
        "started": 0.0, "ended": 60.0, **extra})


def test_aggregation_shows_missing_cells_as_missing(tmp_path):
    grid = load_grid(_grid(tmp_path, TINY_GRID.replace("seeds = [0]", "seeds = [0, 1, 2]")))
    from shortcut_study.compare import Cell

    def record(cell, *metrics, **kw):
        _record_cell(tmp_path / "out", cell, *metrics, **kw)

    for seed, acc in ((0, 50.0), (1, 54.0), (2, 52.0)):  # one (method, agreement, size) with all seeds
        record(Cell("erm", 0.9, 16, seed), acc, 90.0, acc - 5, 10.0, 95.0 - acc, clipped=3 if seed == 2 else 0)
    record(Cell("erm", 0.1, 16, 0), 40.0, 40.0, 40.0, 30.0, 0.0)  # one seed of another
    record(Cell("erm", 0.1, 16, 1), 10.0, 10.0, 10.0, 0.0, 0.0, last=2.5)  # diverged: named, not averaged in
    study = optuna.create_study(study_name="compare-tiny", storage=f"sqlite:///{tmp_path}/o.db", direction="maximize")
    table = write_results(grid, tmp_path / "out", study)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    full = summary[(summary["agreement"] == 0.9) & (summary["digit_size"] == 16) & (summary["method"] == "erm")].iloc[0]
    assert full["seeds_done"] == 3 and full["acc_mean"] == pytest.approx(52.0) and full["acc_sd"] == pytest.approx(2.0)
    assert full["acc_ci_low"] == pytest.approx(52 - 4.303 * 2 / math.sqrt(3), abs=0.01)
    one = summary[(summary["agreement"] == 0.1) & (summary["digit_size"] == 16) & (summary["method"] == "erm")].iloc[0]
    assert one["seeds_done"] == 1 and math.isnan(one["acc_sd"])
    none = summary[summary["method"] == "groupdro+shuffle"]
    assert (none["seeds_done"] == 0).all() and none["acc_mean"].isna().all()  # missing, never zero
    assert "| 0/3 | missing |" in table and "| 3/3 | 52.0 ± 2.0 |" in table
    assert "- erm a=0.1 d=16 seed=1: diverged" in table
    assert "scaled down (the others trained as without it): \n- erm a=0.9 d=16 seed=2: 3" in table
    assert "- erm, 16 px, agreement 0.1: overall 40.00 over 1 seed(s) — the recipe's bar, ≥ 75 %, is NOT met by the mean\n" in table
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert (cells["state"] == "missing").sum() == len(grid.cells) - 5
    assert "- `p1` (5 cells, commit abc, 1.0 min of wall time while its runs ran" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "gap_vs_agreement.png").is_file()
    # a page of `make report` when the results folder holds a comparison
    from shortcut_study.errors import UserError
    from shortcut_study.report import Report, compare_pages

    report = Report(tmp_path)
    compare_pages(report, tmp_path / "out")
    assert {p.stem for p, _ in report.pages} == {"compare_conflicting_vs_agreement", "compare_gap_vs_agreement",
                                                 "compare_overall_vs_agreement"}
    assert "erm (16 px): 40.0 % at agreement 0.1 -> 47.0 % at 0.9" in report.pages[0][1]
    report.discard()
    (tmp_path / "out" / "summary.csv").write_text("method,agreement\nerm,0.1\n")
    with pytest.raises(UserError, match="is not a comparison summary .* compare --aggregate"):
        compare_pages(Report(tmp_path), tmp_path / "out")


def test_comparison_with_another_grid_in_the_same_storage_is_refused(sources, tmp_path, capsys):
    grid = _grid(tmp_path)
    from shortcut_study.compare import open_comparison

    opts = CompareOptions(grid=load_grid(grid), cifar="c", mnist="m", storage=f"sqlite:///{tmp_path}/optuna.db")
    open_comparison(opts)
    code = main(_compare(sources, tmp_path, grid, "--set", "agreements=0.1")[3:])
    assert code == 2
    err = capsys.readouterr().err
    assert "already holds comparison 'tiny' with another grid (differs in agreements)" in err and "--set name=" in err
    assert not (tmp_path / "out-cells").exists()  # a refused grid leaves no record of itself


@pytest.mark.parametrize("text, expected", [
    ('methods = ["erm", "nope"]', "unknown method 'nope' in the grid"),
    ('colour = "red"', "unknown key 'colour' in grid file"),
    ("agreements = [0.05, 0.5]", "grid agreement 0.05 is outside [0.1, 1]"),
    ("agreements = [1.5]", "grid agreement 1.5 is outside [0.1, 1]"),
    ("digit_sizes = [20]", "grid digit size 20 does not fit the 40px canvas"),
    ("seeds = [0, 0]", "grid axis seeds repeats a value"),
    ("seeds = []", "grid axis seeds is empty"),
    ('digit_sizes = ["big"]', "grid axis digit_sizes: 'big' is not an int"),
    ("methods = [", "is not valid TOML"),
    ('[recipe.train]\nepochs = 0', "bad config value train.epochs=0"),
    ('[recipe.train]\ncolour = 1', "unknown config key 'train.colour'"),
])
def test_bad_grid_is_a_one_line_error(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    code = main(["compare", "--grid", str(path), "--cifar", "c", "--mnist", "m", "--storage",
                 f"sqlite:///{tmp_path}/o.db", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_missing_grid_file_and_bad_set(tmp_path, capsys):
    assert main(["compare", "--grid", str(tmp_path / "none.toml"), "--cifar", "c", "--mnist", "m"]) == 2
    assert "grid file not found" in capsys.readouterr().err
    grid = _grid(tmp_path)
    assert main(["compare", "--grid", str(grid), "--cifar", "c", "--mnist", "m", "--set", "agreements=0.1,abc"]) == 2
    assert "grid axis agreements: 'abc' is not a float" in capsys.readouterr().err
    assert main(["compare", "--grid", str(grid), "--cifar", str(tmp_path / "nope.tgz"), "--mnist", "m"]) == 2
    assert "--cifar" in capsys.readouterr().err


def test_dfr_refits_the_erm_cells_model_instead_of_training(sources, tmp_path):
    import torch

    from shortcut_study.diagnostics import score_model
    from shortcut_study.run import Run
    from shortcut_study.train import finish_trained

    grid = _grid(tmp_path, TINY_GRID.replace('"erm", "groupdro+shuffle"', '"erm", "dfr"')
                 .replace("agreements = [0.1, 0.9]", "agreements = [0.9]").replace("digit_sizes = [16, 8]", "digit_sizes = [16]"))
    assert main(_compare(sources, tmp_path, grid)[3:]) == 0
    trials = _study(tmp_path).trials
    assert [t.params["method"] for t in trials] == ["erm"]  # one training run for the two cells
    records = {p.name.split("__")[0]: json.loads(p.read_text()) for p in (tmp_path / "out-cells").glob("*__seed*.json")}
    assert set(records) == {"erm", "dfr"}
    dfr = records["dfr"]
    assert dfr["shared_run"] == "erm a=0.9 d=16 seed=0" and dfr["train_seconds"] == 0.0
    # the record is DFR's refit of the ERM cell's selected model, scored on test
    model, _ = Run(Path("studies") / "compare-tiny-seeds-0" / "cell-0000").load("cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = load_grid(grid).cell_config(_cell("dfr"))
    data = next((tmp_path / "data").glob("strength-*/"))
    refit = finish_trained(model, cfg, data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the ERM model is left as it was
    assert not torch.equal(refit.fc.weight.cpu(), model.fc.weight.cpu())  # only the last layer is refit
    assert torch.equal(refit.conv1.weight.cpu(), model.conv1.weight.cpu())
    scores = score_model(refit, cfg, data)[0]
    assert dfr["test"]["acc"] == pytest.approx(scores["acc"]) and dfr["test"]["gap"] == pytest.approx(scores["gap"])
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert set(summary["method"]) == {"erm", "dfr"} and (summary["seeds_done"] == 1).all()
    # a method that trains a model of its own cannot take another run's
    from shortcut_study.errors import UserError

    with pytest.raises(UserError, match="method groupdro trains a model of its own"):
        finish_trained(model, load_grid(grid, ["methods=erm,groupdro"]).cell_config(_cell("groupdro")), data)


def _cell(method: str):
    from shortcut_study.compare import Cell

    return Cell(method, 0.9, 16, 0)


def test_the_erm_bar_is_judged_on_the_unrounded_mean(tmp_path):
    """74.95 % rounds to 75.0 but misses the ≥ 75 % bar: the line says so, with the interval that holds it."""
    grid = load_grid(_grid(tmp_path, TINY_GRID.replace("seeds = [0]", "seeds = [0, 1, 2]")))
    from shortcut_study.compare import Cell

    for seed, acc in ((0, 73.0), (1, 76.0), (2, 75.85)):
        _record_cell(tmp_path / "out", Cell("erm", 0.1, 16, seed), acc, acc, acc, 50.0, 0.0)
    study = optuna.create_study(study_name="compare-tiny", storage=f"sqlite:///{tmp_path}/o.db", direction="maximize")
    table = write_results(grid, tmp_path / "out", study)
    assert ("- erm, 16 px, agreement 0.1: overall 74.95 [70.8, 79.1] over 3 seed(s) — the recipe's bar, ≥ 75 %, "
            "is NOT met by the mean; its interval holds the bar") in table


def test_a_collapsed_cell_and_its_refit_are_named_and_left_out(tmp_path):
    """An ERM cell whose selected model is at chance with and without the digit (one class for all)
    is a recipe defect, and so is DFR's refit of that very model."""
    grid = load_grid(_grid(tmp_path, TINY_GRID.replace('"groupdro+shuffle"', '"dfr"')
                           .replace("seeds = [0]", "seeds = [0, 1]")))
    from shortcut_study.compare import Cell

    out = tmp_path / "out"
    for seed in (0, 1):
        erm = Cell("erm", 0.9, 16, seed)
        _record_cell(out, erm, *((10.0, 10.1, 9.9, 0.0, 0.2) if seed else (40.0, 95.0, 35.0, 1.0, 60.0)))  # seed 1 collapsed
        _record_cell(out, Cell("dfr", 0.9, 16, seed), 50.0, 70.0, 48.0, 5.0, 22.0, shared_run=erm.label)
    study = optuna.create_study(study_name="compare-tiny", storage=f"sqlite:///{tmp_path}/o.db", direction="maximize")
    table = write_results(grid, out, study)
    assert "- erm a=0.9 d=16 seed=1: collapsed" in table
    assert "- dfr a=0.9 d=16 seed=1: refit of erm a=0.9 d=16 seed=1, which collapsed" in table
    summary = pd.read_csv(out / "summary.csv").set_index(["method", "agreement", "digit_size"])
    assert summary.loc[("erm", 0.9, 16), "seeds_done"] == 1 and summary.loc[("erm", 0.9, 16), "acc_mean"] == 40.0
    assert summary.loc[("dfr", 0.9, 16), "seeds_done"] == 1


def test_a_fresh_copy_of_the_sources_keeps_the_built_datasets(sources, tmp_path):
    """Datasets are keyed by the sources' content: the shared folder made anew each session (same
    archives, new times and paths) reuses what was built; another archive builds anew."""
    import os
    import shutil

    from shortcut_study.compare import dataset_dir
    from shortcut_study.config import make_config

    cfg = make_config("methods", ["build.train_agreement=0.9"])
    before = dataset_dir(cfg, (sources["cifar_tgz"], sources["mnist_tgz"]), tmp_path)
    copies = tmp_path / "copies"
    copies.mkdir()
    for name in ("cifar_tgz", "mnist_tgz"):
        shutil.copy(sources[name], copies / sources[name].name)
        os.utime(copies / sources[name].name, (1e9, 1e9))
    cifar, mnist = copies / sources["cifar_tgz"].name, copies / sources["mnist_tgz"].name
    assert dataset_dir(cfg, (cifar, mnist), tmp_path) == before
    with mnist.open("ab") as f:
        f.write(b"\0")
    assert dataset_dir(cfg, (cifar, mnist), tmp_path) != before
