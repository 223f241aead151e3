"""The benchmark end to end on tiny data: two processes share it, no run is done twice, settings
and epochs are selected by worst-group val, seeds are aggregated with intervals, and a part
measured separately (another storage, another seed) merges into the same table."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from shortcut_study.cli import main

DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "experiments" / "benchmark.toml"

SPEC = """
name = "tiny"
methods = ["erm", "groupdro", "dfr"]
reference = ["erm+shuffle"]
settings = 2
seeds = [0, 1]
rules = ["worst_group", "worst_class"]
preset = "final"

[search.train]
epochs = 1
batch_size = 32
eval_batch_size = 64
tta = "none"

[final.train]
epochs = 1
batch_size = 32
eval_batch_size = 64
tta = "none"
"""


def _args(spec, data, tmp, db, *extra):
    return ["benchmark", "--spec", str(spec), "--data", str(data), "--storage", f"sqlite:///{tmp}/{db}",
            "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--out", str(tmp / "out"), "--heartbeat", "2",
            "--grace", "30", *extra]


def test_two_processes_share_a_benchmark_and_a_part_merges(wide_dataset, tmp_path, monkeypatch, capsys):
    from shortcut_study.benchmark import load_spec
    from shortcut_study.diagnostics import score_model
    from shortcut_study.run import Run
    from shortcut_study.train import finish_trained

    monkeypatch.chdir(tmp_path)  # run folders go under ./studies, as the sweep's
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    assert main(_args(spec, wide_dataset, tmp_path, "a.db", "--workers", "2", "--part", "first")) == 0
    storage = f"sqlite:///{tmp_path}/a.db"
    for method in ("erm", "groupdro"):
        trials = optuna.load_study(study_name=f"benchmark-tiny-{method}", storage=storage).trials
        done = [t.params["job"] for t in trials if t.state.name == "COMPLETE"]
        assert sorted(done) == [0, 1]  # every setting once, none twice
    seeds = optuna.load_study(study_name="benchmark-tiny-seeds", storage=storage).trials
    done = [(t.params["row"], rule, t.params["seed"]) for t in seeds if t.state.name == "COMPLETE"
            for rule in t.params["rule"].split("+")]
    # every (row, rule, seed) once; rules whose choices agree shared one training run
    assert sorted(done) == sorted((r, u, s) for r in ("erm", "groupdro", "erm+shuffle")
                                  for u in ("worst_group", "worst_class") for s in (0, 1))
    chosen = json.loads((tmp_path / "out" / "chosen.json").read_text())["chosen"]
    for t in seeds:
        rules = t.params["rule"].split("+")
        method = t.params["row"].removesuffix("+shuffle")
        assert len({chosen[method][u]["setting"] for u in rules}) == 1  # a shared run has one setting
    shared = json.loads((tmp_path / "out" / "runs" / "erm__worst_class__seed0.json").read_text())
    assert shared["rule"] == "worst_class" and shared["epoch"] >= 1

    chosen = json.loads((tmp_path / "out" / "chosen.json").read_text())
    for method in ("erm", "groupdro"):
        scores = {row["setting"]: row["select_worst_group"] for row in chosen["search"] if row["method"] == method}
        best = max(sorted(scores), key=lambda k: scores[k])
        assert chosen["chosen"][method]["worst_group"]["setting"] == best  # selected by worst-group val
    assert "train.lr" in chosen["chosen"]["groupdro"]["worst_group"]["params"]
    assert "method.eta" in chosen["chosen"]["groupdro"]["worst_group"]["params"]

    # DFR: neither searched nor trained — each ERM seed run's selected model, its last layer refit
    assert "benchmark-tiny-dfr" not in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert "dfr" not in {t.params["row"] for t in seeds}
    dfr, erm = (json.loads((tmp_path / "out" / "runs" / f"{row}__worst_group__seed0.json").read_text())
                for row in ("dfr", "erm"))
    assert dfr["refit_of"] == "erm" and dfr["train_seconds"] == 0.0
    assert (dfr["epoch"], dfr["params"], dfr["training"]) == (erm["epoch"], erm["params"], erm["training"])
    model, _ = Run(Path("studies") / "benchmark-tiny-seeds" / f"erm-{erm['shared_run']}-seed0").load("cpu")
    cfg = load_spec(spec).final_config("dfr", "worst_group", erm["params"], 0)
    scores = score_model(finish_trained(model, cfg, wide_dataset), cfg, wide_dataset)[0]
    assert dfr["test"]["acc"] == pytest.approx(scores["acc"]) and dfr["test"]["gap"] == pytest.approx(scores["gap"])

    table = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| erm | worst_group | 2/2 |" in table and "erm+shuffle (reference" in table
    assert "| dfr (refit of the erm runs' models) | worst_group | 2/2 |" in table
    assert "[" in table.split("| erm | worst_group | 2/2 |")[1].splitlines()[0]  # a 95 % interval from 2 seeds
    assert "`first`" in table

    # a part measured separately: another storage, another seed, the same output folder
    capsys.readouterr()
    assert main(_args(spec, wide_dataset, tmp_path, "b.db", "--set", "seeds=2", "--part", "second")) == 0
    names = {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/b.db")}
    assert names == {"benchmark-tiny-seeds"}  # the choice came from chosen.json: no search again
    assert main(_args(spec, wide_dataset, tmp_path, "b.db", "--set", "seeds=0,1,2", "--aggregate")) == 0
    table = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| erm | worst_group | 3/3 |" in table and "`first`" in table and "`second`" in table
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").glob("*.json"))
    assert len(runs) == 24 and "erm__worst_group__seed2.json" in runs and "dfr__worst_class__seed2.json" in runs


@pytest.mark.parametrize("sets, message", [
    (["methods=erm,nope"], "unknown train.method 'nope'"),
    (["settings=0"], "benchmark settings=0"),
    (["settings=abc"], "benchmark settings='abc'"),
    (["rules=best"], "benchmark rule 'best'"),
    (["reference=groupdro"], "benchmark reference 'groupdro'"),
    (["train.lr=-1"], "train.lr"),
])
def test_bad_benchmark_values_are_one_line(sets, message, wide_dataset, tmp_path, capsys):
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    assert main(_args(spec, wide_dataset, tmp_path, "a.db", *sum((["--set", s] for s in sets), []))) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "a.db").exists()


def test_a_name_used_with_another_budget_is_refused(wide_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC.replace('methods = ["erm", "groupdro", "dfr"]', 'methods = ["erm"]'))
    assert main(_args(spec, wide_dataset, tmp_path, "a.db", "--set", "seeds=0", "--set", "reference=")) == 0
    assert main(_args(spec, wide_dataset, tmp_path, "a.db", "--set", "settings=3", "--set", "reference=",
                      "--out", str(tmp_path / "other"))) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds benchmark 'tiny' with another budget" in err and "settings" in err

    # A choice recorded before a knob existed still holds (the knob kept its behaviour-preserving
    # default); a recorded value that differs from today's is refused, named.
    chosen = tmp_path / "out" / "chosen.json"
    tree = json.loads(chosen.read_text())
    for recipe in ("search", "final"):
        del tree["fingerprint"][recipe]["geometry.norm_mean"]
    chosen.write_text(json.dumps(tree))
    again = _args(spec, wide_dataset, tmp_path, "a.db", "--set", "seeds=0", "--set", "reference=")
    assert main(again) == 0
    tree["fingerprint"]["final"]["train.lr"] = 123.0
    chosen.write_text(json.dumps(tree))
    capsys.readouterr()
    assert main(again) == 2
    err = capsys.readouterr().err.strip()
    assert "was written by another benchmark (differs in final/train.lr)" in err and len(err.splitlines()) == 1


def test_a_strength_grid_trains_each_method_with_the_benchmarks_choice(tmp_path):
    from shortcut_study.compare import load_grid
    from shortcut_study.errors import UserError

    chosen = tmp_path / "chosen.json"
    chosen.write_text(json.dumps({"chosen": {
        "erm": {"worst_group": {"setting": 2, "params": {"train.lr": 0.05, "train.weight_decay": 0.0001}}},
        "groupdro": {"worst_group": {"setting": 1, "params": {"train.lr": 0.1, "method.eta": 0.2}}}}}))
    grid = tmp_path / "g.toml"
    grid.write_text(f'name = "g"\nmethods = ["erm", "erm+shuffle", "groupdro", "dfr"]\nagreements = [0.64]\n'
                    f'digit_sizes = [16]\nseeds = [0]\npreset = "final"\nchosen = "{chosen}"\n')
    g = load_grid(grid)
    by = {c.method: g.cell_config(c) for c in g.cells}
    assert by["erm"].train.lr == 0.05 and by["erm+shuffle"].train.lr == 0.05  # the reference row takes ERM's
    assert by["erm+shuffle"].augment.digit_shuffle_p == 1.0 and by["erm"].augment.digit_shuffle_p == 0.0
    assert by["groupdro"].method["eta"] == 0.2 and by["groupdro"].train.lr == 0.1
    assert by["dfr"].train.lr == 0.05  # a refit of the ERM cell's model: ERM's choice, whatever DFR's
    grid.write_text(grid.read_text().replace('"erm", "erm+shuffle", "groupdro", "dfr"', '"erm", "jtt"'))
    with pytest.raises(UserError, match="no worst-group choice for method jtt"):
        load_grid(grid)


def test_a_diverged_or_collapsed_seed_is_named_and_never_averaged_in():
    from shortcut_study.benchmark import load_spec, summary_rows

    spec = load_spec(DEFAULT_SPEC, ["methods=erm", "reference=", "seeds=0,1,2,3", "rules=worst_group"])

    def run(seed, acc, first=2.3, last=1.0, peak=None, clipped=0):
        return {"row": "erm", "rule": "worst_group", "seed": seed, "part": "p", "params": {}, "setting": 0,
                "train_loss_first": first, "train_loss_last": last, "train_loss_max": peak or first,
                "clipped_steps": clipped, "val": {"acc": acc}, "test": {"acc": acc}}

    runs = [run(0, 60.0, clipped=2), run(1, 62.0), run(2, 10.3, last=2.4), run(3, 55.0, peak=2.7)]
    row = summary_rows(runs, spec)[0]
    assert row["not_converged"] == ["2 (diverged)", "3 (loss spiked)"] and row["seeds_done"] == 2
    assert row["clipped_steps"] == 2  # the steps the bound scaled, over the row's seeds
    assert row["acc_mean"] == 61.0  # the two seeds that trained


def test_rules_that_choose_one_setting_share_a_seed_run():
    from shortcut_study.benchmark import load_spec, seed_jobs

    spec = load_spec(DEFAULT_SPEC, ["methods=erm,groupdro", "reference=erm+shuffle", "seeds=0,1"])
    chosen = {"erm": {"worst_group": {"setting": 1}, "worst_class": {"setting": 1}},
              "groupdro": {"worst_group": {"setting": 0}, "worst_class": {"setting": 2}}}
    jobs = {(j["row"], j["rule"], j["seed"]) for j in seed_jobs(spec, list(spec.rows()), chosen)}
    assert ("erm", "worst_group+worst_class", 0) in jobs and ("erm+shuffle", "worst_group+worst_class", 1) in jobs
    assert ("groupdro", "worst_group", 0) in jobs and ("groupdro", "worst_class", 0) in jobs
    assert len(jobs) == 2 * (1 + 2 + 1)  # erm, erm+shuffle shared; groupdro one run per rule


def test_one_run_selects_an_epoch_per_rule(wide_dataset, tmp_path):
    """`fit(also_select=...)`: each further rule keeps the epoch that scores best under it (the
    first on a tie), with that epoch's model; the run's own rule is `train.select`'s."""
    import math

    from shortcut_study.config import make_config
    from shortcut_study.train import fit

    cfg = make_config("final", ["train.epochs=3", "train.batch_size=32", "train.eval_batch_size=64", "train.tta=none",
                                "train.select=worst_group"])
    result = fit(cfg, wide_dataset, tmp_path / "r", quiet=True, also_select=("worst_class",))
    history = result.history
    by_class = max(history, key=lambda h: (h["val_worst_class_acc"], -h["epoch"]))["epoch"]
    by_group = max(history, key=lambda h: (h["val_worst_group_acc"], -h["epoch"]))["epoch"]
    epoch, model = result.also["worst_class"]
    assert epoch == by_class and result.best_epoch == by_group
    assert (model is result.model) == (epoch == result.best_epoch)
    assert all(math.isfinite(h["val_worst_class_acc"]) for h in history)
