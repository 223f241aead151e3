"""The method harness: every registered method trains, resumes and round-trips its state; group
methods refuse data without digit labels; runs carry their own geometry; config stays a leaf."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from shortcut_study.cli import main
from shortcut_study.config import make_config
from shortcut_study.registry import METHODS
from shortcut_study.run import Run
from shortcut_study.train import fit

from .conftest import TINY_BUILD

TINY = ["train.batch_size=32", "train.eval_batch_size=64", "augment.digit_shuffle_p=0"]
# Per-method settings that keep a two-epoch test run meaningful (JTT: a 1-epoch first stage).
EXTRA = {"jtt": ["method.identify_epochs=1", "method.upweight=2"]}


def _sets(name: str, epochs: int) -> list[str]:
    return [*TINY, f"train.epochs={epochs}", f"train.method={name}", *EXTRA.get(name, [])]


class Stop(Exception):
    pass


def _stop_after(n: int):
    def on_epoch(epoch, record):
        if epoch == n:
            raise Stop

    return on_epoch


@pytest.mark.parametrize("name", METHODS.names())
def test_method_trains_resumes_and_round_trips_its_state(name, dataset, tmp_path):
    assert name in METHODS
    out = tmp_path / name
    with pytest.raises(Stop):
        fit(make_config(sets=_sets(name, 2)), dataset, out, on_epoch=_stop_after(1), quiet=True)
    state = Run(out).load_last()  # weights_only: the method's state is plain tensors and numbers
    assert state["method"]["name"] == name and state["epoch"] == 1
    result = fit(make_config(sets=_sets(name, 2)), dataset, out, resume=True, quiet=True)
    assert [h["epoch"] for h in result.history] == [1, 2] and 0 <= result.best["acc"] <= 100
    # the state saved after the resumed epoch loads into a fresh method of the same kind
    saved = Run(out).load_last()["method"]["state"]
    from shortcut_study.train import build_trainer, load_data
    from shortcut_study.runtime import resolve_runtime

    cfg = make_config(sets=_sets(name, 2))
    rt = resolve_runtime("cpu")
    train, _ = load_data(cfg, dataset, rt)
    fresh = build_trainer(cfg, train, rt, dataset).method
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    assert again.keys() == saved.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(again[key], value), key
    # q1_model.pt stays a plain state_dict of the course's CNN
    from shortcut_study.model import CNN

    CNN().load_state_dict(torch.load(out / "q1_model.pt", weights_only=True))


def test_groupdro_weights_move_towards_the_worst_group(dataset, tmp_path):
    out = tmp_path / "gdro"
    fit(make_config(sets=_sets("groupdro", 1) + ["method.eta=0.5"]), dataset, out, quiet=True)
    q = Run(out).load_last()["method"]["state"]["q"]
    present = int((q > 0).sum())
    assert len(q) == 100 and abs(float(q.sum()) - 1) < 1e-5 and float(q.max()) > 1.5 / present  # no longer uniform


def test_jtt_finds_an_error_set_and_dfr_refits_the_last_layer(dataset, tmp_path):
    fit(make_config(sets=_sets("jtt", 1)), dataset, tmp_path / "jtt", quiet=True)
    errors = Run(tmp_path / "jtt").load_last()["method"]["state"]["errors"]
    assert errors.dtype == torch.bool and len(errors) == 120
    erm = fit(make_config(sets=_sets("erm", 1)), dataset, tmp_path / "erm", quiet=True)
    dfr = fit(make_config(sets=_sets("dfr", 1)), dataset, tmp_path / "dfr", quiet=True)
    a = torch.load(tmp_path / "erm" / "q1_model.pt", weights_only=True)
    b = torch.load(tmp_path / "dfr" / "q1_model.pt", weights_only=True)
    assert torch.equal(a["conv1.weight"], b["conv1.weight"])  # same seed, same ERM features
    assert not torch.equal(a["fc.weight"], b["fc.weight"])  # the last layer was refit
    assert erm.best_epoch == 1 and 0 <= dfr.best["acc"] <= 100


def test_method_hyperparameters_are_config_and_searched():
    cfg = make_config(sets=["train.method=groupdro", "method.eta=0.05"])
    assert cfg.flat()["method.eta"] == 0.05 and cfg.flat()["method.adjustment"] == 0.0
    from shortcut_study.study import SweepOptions, search_space

    space = search_space(cfg, SweepOptions(data=None, sets=("train.method=groupdro", "train.lr=0.1")))
    assert "method.eta" in space and "train.lr" not in space  # pinned by --set
    assert "method.sampling" not in space  # a switch, never searched
    assert "method.eta" not in search_space(make_config(), SweepOptions(data=None))


def test_the_sweep_leaves_digit_shuffle_out_unless_asked():
    from shortcut_study.study import SHUFFLE_KEY, SweepOptions, base_sets, search_space

    jtt = SweepOptions(data=None, sets=("train.method=jtt",))
    assert SHUFFLE_KEY not in search_space(make_config(sets=["train.method=jtt"]), jtt)
    assert make_config(sets=base_sets(jtt)).augment.digit_shuffle_p == 0.0  # a method is studied without it
    asked = SweepOptions(data=None, sets=("train.method=jtt",), search_shuffle=True)
    assert SHUFFLE_KEY in search_space(make_config(sets=["train.method=jtt"]), asked)
    pinned = SweepOptions(data=None, sets=("train.method=jtt", f"{SHUFFLE_KEY}=0.5"))
    assert make_config(sets=base_sets(pinned)).augment.digit_shuffle_p == 0.5
    erm = SweepOptions(data=None)
    assert make_config(sets=base_sets(erm)).augment.digit_shuffle_p == 1.0  # the course recipe keeps its default


@pytest.mark.parametrize("sets, message", [
    (["train.method=nope"], "train.method='nope': must be one of"),
    (["train.method=jtt", "method.eta=1"], "unknown config key 'method.eta': method jtt has"),
    (["train.method=groupdro", "method.eta=-1"], "method.eta"),
    (["train.method=groupdro", "method.eta=abc"], "must be a float"),
    (["train.select=best"], "train.select"),
])
def test_bad_method_config_is_one_line(sets, message, dataset, tmp_path, capsys):
    args = ["train", "--data", str(dataset), "--out", str(tmp_path / "r")] + sum((["--set", s] for s in sets), [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_group_method_without_digit_labels_says_annotate(dataset, tmp_path, capsys):
    copy = tmp_path / "course"
    shutil.copytree(dataset, copy)
    (copy / "metadata.csv").unlink()
    for name in ("groupdro", "reweight", "resample", "dfr"):
        assert main(["train", "--data", str(copy), "--out", str(tmp_path / name), "--epochs", "1",
                     "--set", f"train.method={name}"]) == 2
        err = capsys.readouterr().err
        assert f"shortcut-study data annotate {copy}" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / name).exists()
    # methods without group labels train there
    assert main(["train", "--data", str(copy), "--out", str(tmp_path / "lff"), "--epochs", "1",
                 *sum((["--set", s] for s in TINY + ["train.method=lff"]), [])]) == 0


def test_resume_refuses_another_method_or_changed_options(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--out", str(out), *sum((["--set", s] for s in TINY), [])]
    assert main([*args, "--epochs", "1"]) == 0
    before = (out / "q1_model.pt").read_bytes()
    assert main([*args, "--resume", "--epochs", "3"]) == 2
    assert "--resume continues" in capsys.readouterr().err
    assert main([*args, "--resume", "--set", "train.method=groupdro"]) == 2
    assert "holds the state of method erm" in capsys.readouterr().err
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "drop --resume" in capsys.readouterr().err
    assert (out / "q1_model.pt").read_bytes() == before
    assert main([*args, "--resume"]) == 0  # same config: nothing left to train, nothing changed


def test_a_run_is_predicted_and_diagnosed_on_its_own_geometry(sources, tmp_path):
    data = tmp_path / "d12"
    geometry = ["--set", "geometry.digit_size=12", "--set", "geometry.digit_top=28", "--set", "geometry.digit_left=28"]
    assert main(["data", "build", "--cifar", str(sources["cifar_tgz"]), "--mnist", str(sources["mnist_tgz"]),
                 "--out", str(data), *TINY_BUILD, *geometry]) == 0
    run = tmp_path / "run"
    own_stats = ["--set", "geometry.norm_mean=dataset", "--set", "geometry.norm_std=dataset"]
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *geometry, *own_stats,
                 *sum((["--set", s] for s in TINY), [])]) == 0
    cfg = Run(run).config()
    assert cfg.geometry.digit_size == 12 and cfg.geometry.digit_top == 28
    # normalised with this layout's own statistics, measured on its training split at build time;
    # the run records the numbers, so predict and report use them too
    recorded = json.loads((data / "normalization.json").read_text())
    assert recorded["images"] == 120 and cfg.geometry.mean == tuple(recorded["mean"])
    assert cfg.geometry.std == tuple(recorded["std"]) and cfg.geometry.mean != make_config().geometry.mean

    # predict uses the run's boxes: a model that reads only the 12-px digit box sees what predict feeds it
    seen = []
    from shortcut_study import diagnostics, evaluate

    real = evaluate.predict_logits

    def spy(model, images, rt, batch_size=1024, tta="none", geom=None):
        seen.append(geom)
        return real(model, images, rt, batch_size, tta, geom)

    evaluate.predict_logits = spy
    diagnostics.predict_logits = spy
    try:
        assert main(["predict", "--checkpoint", str(run / "q1_model.pt"), "--images", str(data / "test_unlabeled"),
                     "--out", str(tmp_path / "p.txt")]) == 0
        from shortcut_study.report import build_report

        build_report(run / "q1_model.pt", data, tmp_path / "rep", study=None, max_images=40)
    finally:
        evaluate.predict_logits = real
        diagnostics.predict_logits = real
    assert seen and all(g is None or (g.digit_size == 12 and g.mean == cfg.geometry.mean) for g in seen)
    assert any(g is not None and g.digit_box == (slice(28, 40), slice(28, 40)) for g in seen)
    # annotate reads the digit where this layout has it
    copy = tmp_path / "d12-copy"
    shutil.copytree(data, copy)
    (copy / "metadata.csv").unlink()
    assert main(["data", "annotate", str(copy), *geometry]) == 0
    import pandas as pd

    assert len(pd.read_csv(copy / "metadata.csv")) == 190
    assert main(["data", "annotate", str(copy), "--force", "--set", "train.lr=0.1"]) == 2
    (copy / "normalization.json").unlink()  # a dataset without recorded statistics: one error line
    assert main(["train", "--data", str(copy), "--out", str(tmp_path / "run2"), "--epochs", "1", *geometry,
                 *own_stats, *sum((["--set", s] for s in TINY), [])]) == 2


def test_torn_config_is_detected(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    tree = json.loads((run / "config.json").read_text())
    tree["_model_sha256"] = "0" * 64  # as if a crash had separated the pair
    (run / "config.json").write_text(json.dumps(tree))
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 40)).save(images / "img_0.png")
    assert main(["predict", "--checkpoint", str(run / "q1_model.pt"), "--images", str(images),
                 "--out", str(tmp_path / "x.txt")]) == 2
    assert "does not belong to" in capsys.readouterr().err


def test_methods_table_is_written_with_its_goals(dataset, tmp_path):
    from shortcut_study.bench import run_methods_table

    md = tmp_path / "methods.md"
    text = run_methods_table(dataset, methods=("erm", "groupdro", "jtt"), md=md, out_dir=tmp_path,
                             sets=["train.epochs=1", "train.batch_size=32", "train.eval_batch_size=64"])
    assert "erm + digit shuffle" in text and "capability" in text
    body = md.read_text()
    assert "## Against the goals" in body and "groupdro closes" in body and "Recipe (preset `methods`)" in body
    assert list(tmp_path.glob("methods-*.csv"))


def test_config_does_not_import_the_modules_it_checks():
    code = ("import sys; import shortcut_study.config as c; "
            "bad = [m for m in ('shortcut_study.train', 'shortcut_study.evaluate', 'shortcut_study.methods') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


class _Payload:
    """Pickles to a call of os.system: what a crafted checkpoint would hide."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", ["last.pt", "q1_model.pt"])
def test_a_crafted_checkpoint_runs_no_code(target, trained_run, dataset, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker)}, run / target)
    if target == "last.pt":
        args = ["train", "--data", str(dataset), "--out", str(run), "--resume"]
    else:
        args = ["predict", "--checkpoint", str(run / target), "--images", str(dataset / "test_unlabeled"),
                "--out", str(tmp_path / "p.txt")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert not marker.exists()


def test_balanced_100_groups_make_the_digit_independent_of_the_label():
    from shortcut_study.groups import group_ids
    from shortcut_study.methods.reweight import balancing_weights

    # agreement 0.64 as the builder draws it: per class 640 aligned images, 40 of each other digit
    labels = torch.arange(10).repeat_interleave(1000)
    digits = torch.cat([torch.cat([torch.full((640,), c), torch.tensor([d for d in range(10) if d != c]).repeat(40)])
                        for c in range(10)])
    for scheme, groups, aligned_share in (("class_digit", 100, 0.1), ("aligned", 20, 0.5)):
        ids = group_ids(labels, digits, scheme)
        counts = torch.bincount(ids, minlength=groups).float()
        mass = balancing_weights(counts)[ids]  # each image's weight
        share = float(mass[digits == labels].sum() / mass.sum())
        assert abs(share - aligned_share) < 1e-6, (scheme, share)  # 100 groups: the unbiased rate
        assert abs(float(mass.mean()) - 1) < 1e-6
    ids = group_ids(labels, digits)
    cells = torch.zeros(100).index_add_(0, ids, balancing_weights(torch.bincount(ids, minlength=100).float())[ids])
    assert torch.allclose(cells, cells[0].expand(100))  # every (class, digit) cell weighs the same


def test_sweep_searches_the_chosen_methods_own_hyperparameters(dataset, tmp_path):
    import optuna

    assert main(["sweep", "--data", str(dataset), "--study", "m", "--n-trials", "2", "--epochs", "1", "--subset", "0",
                 "--storage", f"sqlite:///{tmp_path}/o.db", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                 *sum((["--set", s] for s in TINY + ["train.method=groupdro"]), [])]) == 0
    trials = optuna.load_study(study_name="m", storage=f"sqlite:///{tmp_path}/o.db").trials
    assert len(trials) == 2 and all("method.eta" in t.params and "method.adjustment" in t.params for t in trials)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    runs = [r for r in mlflow.search_runs(experiment_names=["m"], output_format="list") if "trial" in r.data.tags]
    assert all(r.data.params["train.method"] == "groupdro" and "method.eta" in r.data.params for r in runs)


def test_reference_pipeline_draws_by_the_methods_weights(dataset, tmp_path):
    """resample with the course's DataLoader pipeline still draws group-balanced batches."""
    from shortcut_study.runtime import resolve_runtime
    from shortcut_study.train import build_trainer, load_data

    cfg = make_config(sets=[*TINY, "train.method=resample", "train.pipeline=reference", "train.num_workers=0"])
    rt = resolve_runtime("cpu")
    train, _ = load_data(cfg, dataset, rt)
    trainer = build_trainer(cfg, train, rt, dataset)
    torch.manual_seed(0)
    batches = [b for _ in range(10) for b in trainer.batches()]
    groups = torch.cat([b.group for b in batches])
    present = torch.unique(trainer.method.groups_of(train))
    # group-balanced draws: each (class, digit) group present in the data about equally often
    expected_aligned = float((present // 10 == present % 10).float().mean())
    aligned = float((torch.cat([b.digit for b in batches]) == torch.cat([b.y for b in batches])).float().mean())
    assert abs(aligned - expected_aligned) < 0.1, (aligned, expected_aligned)
    assert set(groups.tolist()) <= set(present.tolist())
    assert fit(cfg, dataset, tmp_path / "r", quiet=True).history
