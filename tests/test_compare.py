"""The shortcut-strength comparison end to end on synthetic sources: a tiny grid shared by two
processes, a killed cell rerun, aggregation with missing cells, plots, and bad grids."""

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
from shortcut_study.compare import CompareOptions, load_grid
from shortcut_study.compare_results import write_results
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


def _compare(sources, tmp_path: Path, grid: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shortcut_study.cli", "compare", "--grid", str(grid),
            "--cifar", str(sources["cifar_tgz"]), "--mnist", str(sources["mnist_tgz"]),
            "--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *extra]


def _study(tmp_path: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=f"compare-{name}", storage=open_storage(f"sqlite:///{tmp_path}/optuna.db"))


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


def test_killed_cell_is_failed_and_rerun(sources, tmp_path):
    grid = _grid(tmp_path, TINY_GRID.replace('digit_sizes = [16, 8]', 'digit_sizes = [16]')
                 .replace('agreements = [0.1, 0.9]', 'agreements = [0.9]'))
    cmd = _compare(sources, tmp_path, grid, "--heartbeat", "1", "--grace", "3")
    kill_once_training(cmd, f"sqlite:///{tmp_path}/optuna.db", tmp_path, study="compare-tiny")
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    trials = _study(tmp_path).trials
    complete = [json.dumps(t.params, sort_keys=True) for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2 and len(set(complete)) == 2
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1  # the killed cell, failed after its grace and run again
    assert not failed[0].params or json.dumps(failed[0].params, sort_keys=True) in complete
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["compare-tiny"], filter_string="tags.role = 'cell'")
    assert sorted(runs["status"]) == ["FAILED", "FINISHED", "FINISHED"]


def test_aggregation_shows_missing_cells_as_missing(tmp_path):
    grid = load_grid(_grid(tmp_path, TINY_GRID.replace("seeds = [0]", "seeds = [0, 1, 2]")))
    study = optuna.create_study(study_name="compare-tiny", storage=f"sqlite:///{tmp_path}/o.db", direction="maximize")
    from optuna.distributions import CategoricalDistribution

    dists = {k: CategoricalDistribution(v) for k, v in grid.cell_choices.items()}
    for seed, acc in ((0, 50.0), (1, 54.0), (2, 52.0)):  # one (method, agreement, size) with all seeds
        study.add_trial(optuna.trial.create_trial(
            params={"method": "erm", "agreement": 0.9, "digit_size": 16, "seed": seed}, distributions=dists, value=acc,
            user_attrs={"acc": acc, "aligned_acc": 90.0, "conflicting_acc": acc - 5, "worst_group_acc": 10.0,
                        "gap": 95.0 - acc, "cf_gap": 30.0, "seconds": 3.0}))
    study.add_trial(optuna.trial.create_trial(  # one seed of another
        params={"method": "erm", "agreement": 0.1, "digit_size": 16, "seed": 0}, distributions=dists, value=40.0,
        user_attrs={"acc": 40.0, "aligned_acc": 40.0, "conflicting_acc": 40.0, "worst_group_acc": 30.0, "gap": 0.0,
                    "cf_gap": 0.0, "seconds": 3.0}))
    table = write_results(study, grid, tmp_path / "out")
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    full = summary[(summary["agreement"] == 0.9) & (summary["digit_size"] == 16) & (summary["method"] == "erm")].iloc[0]
    assert full["seeds_done"] == 3 and full["acc_mean"] == pytest.approx(52.0) and full["acc_sd"] == pytest.approx(2.0)
    assert full["acc_ci_low"] == pytest.approx(52 - 4.303 * 2 / math.sqrt(3), abs=0.01)
    one = summary[(summary["agreement"] == 0.1) & (summary["digit_size"] == 16) & (summary["method"] == "erm")].iloc[0]
    assert one["seeds_done"] == 1 and math.isnan(one["acc_sd"])
    none = summary[summary["method"] == "groupdro+shuffle"]
    assert (none["seeds_done"] == 0).all() and none["acc_mean"].isna().all()  # missing, never zero
    assert "| 0/3 | missing |" in table and "| 3/3 | 52.0 ± 2.0 |" in table
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert (cells["state"] == "missing").sum() == len(grid.cells) - 4
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
    code = main(_compare(sources, tmp_path, grid, "--set", "seeds=0,1")[3:])
    assert code == 2
    err = capsys.readouterr().err
    assert "already holds comparison 'tiny' with another grid (differs in seeds)" in err and "--set name=" in err


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
