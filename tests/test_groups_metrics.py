"""Groups are (class, digit), 100 of them; one metric table; worst group over the crossed split;
a shuffled batch carries the digits it shows; bad group and selection settings are one line."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from shortcut_study import metrics
from shortcut_study.cli import main
from shortcut_study.config import SELECT_METRICS, make_config
from shortcut_study.groups import group_ids, group_name, num_groups
from shortcut_study.metrics import METRICS, Metric, Scores, eval_metrics
from shortcut_study.train import fast_batches, fit, load_data
from shortcut_study.runtime import resolve_runtime

TINY = ["--set", "train.batch_size=32", "--set", "train.eval_batch_size=64"]


def test_groups_are_class_and_digit():
    labels, digits = torch.tensor([0, 3, 3, 9, 5]), torch.tensor([0, 7, 3, 2, -1])
    assert group_ids(labels, digits).tolist() == [0, 37, 33, 92, -1] and num_groups("class_digit") == 100
    assert group_name(37) == "cat, digit 7"
    # the ablation: (class, digit == label), 20 groups
    assert group_ids(labels, digits, "aligned").tolist() == [1, 6, 7, 18, -1] and num_groups("aligned") == 20


def _scores(crossed: np.ndarray, labels: np.ndarray, agreement: float = 0.64) -> Scores:
    digits = np.arange(len(labels)) % 10
    preds = crossed[np.arange(len(labels)), digits]
    return Scores(preds, labels, digits, crossed, agreement)


def test_worst_group_is_the_minimum_over_the_crossed_cells():
    labels = np.repeat(np.arange(10), 20)
    crossed = np.repeat(labels[:, None], 10, axis=1)  # right everywhere ...
    crossed[labels == 4, 7] = 0  # ... but class 4 rendered with digit 7 is always wrong
    crossed[(labels == 2) & (np.arange(200) % 2 == 0), 5] = 9  # and half of (class 2, digit 5)
    m = eval_metrics(_scores(crossed, labels))
    assert m["worst_group_acc"] == 0.0 and m["mean_group_acc"] == pytest.approx(100 - 1.5)
    cells = _scores(crossed, labels).cells()
    assert cells.shape == (10, 10) and cells[2, 5] == 50.0 and np.isfinite(cells).all()
    # in-distribution: the digit-aligned cells weigh the training agreement, the others share the rest
    assert m["id_acc"] == pytest.approx(0.64 * 100 + 0.36 * (100 - 150 / 90))
    assert m["cf_aligned_acc"] == 100.0  # neither broken cell is aligned


def test_every_selection_rule_names_a_declared_metric_and_adding_one_is_one_entry(monkeypatch):
    assert set(SELECT_METRICS.values()) <= set(METRICS)
    for key, m in METRICS.items():
        assert m.key == key and m.title and m.needs in ("labels", "digits", "crossed", "agreement") and m.help
    labels = np.repeat(np.arange(10), 3)
    s = _scores(np.repeat(labels[:, None], 10, axis=1), labels)
    assert set(eval_metrics(s)) == set(METRICS) | {"n", "aligned_fraction"}
    monkeypatch.setitem(METRICS, "error_rate", Metric("error_rate", "error", "labels",
                                                      lambda s: 100 - float(s.correct.mean() * 100), help="x"))
    assert eval_metrics(s)["error_rate"] == 0.0
    assert "error" in metrics.format_metrics(eval_metrics(s))


def test_without_digits_only_the_label_metrics_are_given():
    labels = np.arange(20) % 10
    m = eval_metrics(Scores(labels, labels, np.full(20, -1)))
    assert set(m) == {"acc", "worst_class_acc", "n"} and m["acc"] == 100.0


def test_a_shuffled_batch_carries_the_digits_it_shows(dataset):
    cfg = make_config(sets=["augment.digit_shuffle_p=1", "augment.flip=none"])
    rt = resolve_runtime("cpu")
    train, _ = load_data(cfg, dataset, rt)
    order = torch.arange(len(train))
    torch.manual_seed(0)
    batch = next(fast_batches(train, make_config(sets=["augment.digit_shuffle_p=1", "augment.flip=none",
                                                       "train.batch_size=64"]), order))
    from shortcut_study.augment import normalize

    patches = normalize(train.images[:64])[:, :, 24:, 24:].reshape(64, -1)
    moved = 0
    for i in range(64):
        donor = int(torch.nonzero(torch.isclose(patches, batch.x[i, :, 24:, 24:].reshape(1, -1)).all(1))[0])
        assert batch.digit[i] == train.digits[donor]  # the digit of the patch it shows
        moved += donor != i
    assert moved > 32
    assert torch.equal(batch.group, group_ids(batch.y, batch.digit))


def test_worst_group_selection_trains_and_scores_the_crossed_val(wide_dataset, tmp_path):
    cfg = make_config(sets=["train.select=worst_group", "train.epochs=2", "train.batch_size=32", "train.tta=flip",
                            "train.eval_batch_size=64", "augment.digit_shuffle_p=0"])
    result = fit(cfg, wide_dataset, tmp_path / "r", quiet=True)
    scored = [h for h in result.history if "val_worst_group_acc" in h]
    assert len(scored) == 2  # every evaluated epoch scored on the crossed val
    best = max(scored, key=lambda h: h["val_worst_group_acc"])
    assert result.best_epoch == best["epoch"]
    assert {"worst_group_acc", "mean_group_acc", "id_acc", "cf_gap"} <= set(result.best)
    from shortcut_study.data.layout import load_split

    assert result.val_scores.crossed.shape == (len(load_split(wide_dataset, "val")), 10) and result.model is not None
    from shortcut_study.diagnostics import score_run

    test, _, _ = score_run(tmp_path / "r", wide_dataset)
    assert 0 <= test["worst_group_acc"] <= test["mean_group_acc"] <= 100 and math.isfinite(test["id_acc"])
    # The selected epoch's scores, reused as the run's result, are what scoring the model anew gives.
    from shortcut_study.evaluate import score_split
    from shortcut_study.metrics import eval_metrics
    from shortcut_study.runtime import train_runtime

    val = load_split(wide_dataset, "val")
    fresh = eval_metrics(score_split(result.model, val, train_runtime(cfg.train), 64, cfg.train.tta, cfg.geometry))
    common = set(fresh) & set(result.best)  # id_acc needs the training agreement, which fit knows
    assert len(common) >= 10 and {k: round(fresh[k], 6) for k in common} == {k: round(result.best[k], 6) for k in common}


def test_selection_on_fewer_val_images_is_class_balanced_and_shared_by_every_seed(wide_dataset, tmp_path):
    """`train.val_images` cuts the selection split to a class-balanced subset, the same one whatever
    the run's seed: every run's val numbers are on the same images."""
    from shortcut_study.data.layout import load_split

    val = load_split(wide_dataset, "val")
    runs = []
    for seed in (0, 1):
        cfg = make_config(sets=["train.select=worst_group", "train.epochs=1", "train.batch_size=32",
                                "train.eval_batch_size=64", "train.val_images=30", f"train.seed={seed}"])
        runs.append(fit(cfg, wide_dataset, tmp_path / f"r{seed}", quiet=True))
    kept = [r.val_scores for r in runs]
    assert len(kept[0].labels) < len(val) and kept[0].crossed.shape == (len(kept[0].labels), 10)
    counts = np.bincount(kept[0].labels, minlength=10)
    assert counts.max() <= 3 and (counts == np.minimum(np.bincount(val.labels.numpy(), minlength=10), 3)).all()
    assert (kept[0].labels == kept[1].labels).all() and (kept[0].digits == kept[1].digits).all()


@pytest.mark.parametrize("sets, message", [
    (["train.groups=cells"], "train.groups='cells': must be one of class_digit, aligned"),
    (["train.select=best_group"], "train.select='best_group': must be one of"),
    (["train.val_images=-5"], "train.val_images=-5: must be >= 0"),
])
def test_bad_group_or_selection_setting_is_one_line(sets, message, dataset, tmp_path, capsys):
    args = ["train", "--data", str(dataset), "--out", str(tmp_path / "r"), *TINY] + sum((["--set", s] for s in sets), [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("select", ["worst_group", "mean_group", "conflicting"])
def test_digit_selection_without_digit_labels_says_annotate(select, dataset, tmp_path, capsys):
    copy = tmp_path / "course"
    shutil.copytree(dataset, copy)
    (copy / "metadata.csv").unlink()
    assert main(["train", "--data", str(copy), "--out", str(tmp_path / "r"), "--epochs", "1", *TINY,
                 "--set", f"train.select={select}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"shortcut-study data annotate {copy}" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
    # worst_class needs no digit
    assert main(["train", "--data", str(copy), "--out", str(tmp_path / "w"), "--epochs", "1", *TINY,
                 "--set", "train.select=worst_class", "--set", "augment.digit_shuffle_p=0"]) == 0


def test_crossed_selection_on_a_val_missing_a_digit_is_one_line(dataset, tmp_path, capsys):
    import pandas as pd

    copy = tmp_path / "course"
    shutil.copytree(dataset, copy)
    meta = pd.read_csv(copy / "metadata.csv")
    meta.loc[(meta["split"] == "val") & (meta["digit"] == 7), "digit"] = 3  # no val image shows a 7
    meta.to_csv(copy / "metadata.csv", index=False)
    assert main(["train", "--data", str(copy), "--out", str(tmp_path / "r"), "--epochs", "1", *TINY,
                 "--set", "train.select=worst_group"]) == 2
    err = capsys.readouterr().err.strip()
    assert "do not show every digit" in err and len(err.splitlines()) == 1, err


def test_the_20_group_ablation_trains(dataset, tmp_path):
    cfg = make_config(sets=["train.method=groupdro", "train.groups=aligned", "train.epochs=1", "train.batch_size=32",
                            "augment.digit_shuffle_p=0"])
    fit(cfg, dataset, tmp_path / "g", quiet=True)
    from shortcut_study.run import Run

    assert len(Run(tmp_path / "g").load_last()["method"]["state"]["q"]) == 20
