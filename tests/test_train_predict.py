"""Training, resuming, prediction, grading and annotation through the command line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from PIL import Image

from shortcut_study.cli import main
from shortcut_study.config import make_config
from shortcut_study.errors import UserError
from shortcut_study.model import CNN
from shortcut_study.train import fit



def test_train_writes_checkpoints_and_history(trained_run):
    state = torch.load(trained_run / "q1_model.pt", weights_only=True)
    CNN().load_state_dict(state)  # a plain state_dict of the required CNN
    hist = pd.read_csv(trained_run / "history.csv")
    assert list(hist["epoch"]) == [1, 2]
    assert {"train_loss", "val_acc", "val_aligned_acc", "val_conflicting_acc", "val_worst_class_acc",
            "images_per_s"} <= set(hist.columns)
    assert "val_worst_group_acc" not in hist.columns  # crossed val per epoch only when selection needs it
    assert (trained_run / "last.pt").is_file() and (trained_run / "config.json").is_file()


@pytest.mark.parametrize("extra", [[], ["train.init=whiten", "train.lookahead=0.95"]])
def test_resume_continues_where_it_stopped(dataset, tmp_path, extra):
    cfg = make_config(sets=["train.batch_size=32", "train.epochs=3", "train.eval_batch_size=64", *extra])
    out = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop_after_two(epoch, record):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, dataset, out, on_epoch=stop_after_two, quiet=True)
    lookahead = torch.load(out / "last.pt", weights_only=True)["lookahead"]
    assert (lookahead is not None and lookahead["steps"] > 0) == bool(extra)  # the slow weights are saved too
    result = fit(cfg, dataset, out, resume=True, quiet=True)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


def test_training_is_seeded(dataset, tmp_path):
    cfg = make_config(sets=["train.batch_size=32", "train.epochs=1", "train.precision=fp32"])
    a = fit(cfg, dataset, tmp_path / "a", quiet=True)
    b = fit(cfg, dataset, tmp_path / "b", quiet=True)
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]


@pytest.mark.parametrize("sets", [
    ["train.pipeline=reference", "train.num_workers=0", "augment.flip=both", "augment.erase_p=0.5",
     "augment.noise_sigma=0.1"],
    ["train.optimizer=adamw", "train.lr=0.003", "train.schedule=onecycle", "train.ema_decay=0.9", "train.tta=flip_shift"],
    ["train.schedule=step", "train.subset=50", "train.precision=fp32", "train.channels_last=false"],
])
def test_other_pipelines_and_options_train(dataset, tmp_path, sets):
    cfg = make_config(sets=["train.batch_size=32", "train.epochs=1", *sets])
    result = fit(cfg, dataset, tmp_path / "run", quiet=True)
    assert 0 <= result.best["acc"] <= 100


def test_nan_loss_is_a_clear_error(dataset, tmp_path, monkeypatch):
    from shortcut_study.methods.erm import ERM

    def exploding(self, batch):  # a loss that overflows, as a too-high lr would
        loss, logits = ERM.__bases__[0].loss(self, batch)
        return loss * float("inf"), logits

    monkeypatch.setattr(ERM, "loss", exploding)
    cfg = make_config(sets=["train.batch_size=32", "train.epochs=1"])
    with pytest.raises(UserError, match="diverged"):
        fit(cfg, dataset, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "q1_model.pt").exists() and not (tmp_path / "run" / "config.json").exists()


def test_predict_and_evaluate(trained_run, dataset, tmp_path, capsys):
    out = tmp_path / "q1_test.txt"
    assert main(["predict", "--checkpoint", str(trained_run / "q1_model.pt"),
                 "--images", str(dataset / "test_unlabeled"), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    names = [ln.split(",")[0] for ln in lines]
    assert len(lines) == 30 and names == sorted(names) and names[:3] == ["img_0.png", "img_1.png", "img_10.png"]
    assert all(ln.split(",")[1].isdigit() for ln in lines)
    capsys.readouterr()
    assert main(["evaluate", "--predictions", str(out), "--labels", str(dataset / "test_labels.csv")]) == 0
    report = capsys.readouterr().out
    assert "overall" in report and "digit-conflicting" in report and "rubric band" in report


def test_predict_bad_inputs(trained_run, dataset, tmp_path, capsys):
    images = tmp_path / "imgs"
    shutil.copytree(dataset / "test_unlabeled", images)
    Image.new("RGB", (64, 64)).save(images / "img_99.png")
    out = tmp_path / "q1_test.txt"
    assert main(["predict", "--checkpoint", str(trained_run / "q1_model.pt"), "--images", str(images),
                 "--out", str(out)]) == 2
    assert "64x64 image, expected 40x40" in capsys.readouterr().err
    assert not out.exists()  # nothing half-written
    bad_ckpt = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, bad_ckpt)
    assert main(["predict", "--checkpoint", str(bad_ckpt), "--images", str(dataset / "test_unlabeled"),
                 "--out", str(out)]) == 2
    assert "does not fit the required CNN" in capsys.readouterr().err


def test_predict_uses_the_runs_test_time_augmentation(trained_run, dataset, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "q1_model.pt", run)
    cfg = make_config(sets=["train.tta=flip_shift"])
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    images = str(dataset / "test_unlabeled")
    outs = {}
    for tta in ("auto", "flip_shift", "none"):
        outs[tta] = tmp_path / f"{tta}.txt"
        assert main(["predict", "--checkpoint", str(run / "q1_model.pt"), "--images", images, "--out", str(outs[tta]),
                     "--tta", tta]) == 0
    assert outs["auto"].read_text() == outs["flip_shift"].read_text()
    assert main(["predict", "--checkpoint", str(run / "q1_model.pt"), "--images", images,
                 "--out", str(tmp_path / "x.txt"), "--tta", "sideways"]) == 2
    assert "unknown test-time augmentation 'sideways'" in capsys.readouterr().err
    # the boolean of earlier versions still reads
    assert make_config(sets=["train.tta_flip=true"]).train.tta == "flip"
    assert make_config(sets=["train.tta_flip=false"]).train.tta == "none"


def test_evaluate_bad_predictions(dataset, tmp_path, capsys):
    labels = dataset / "test_labels.csv"
    names = pd.read_csv(labels)["file"].tolist()
    missing = tmp_path / "missing.txt"
    missing.write_text("".join(f"{n},0\n" for n in names[1:]))
    assert main(["evaluate", "--predictions", str(missing), "--labels", str(labels)]) == 2
    assert "no prediction for 1 image" in capsys.readouterr().err
    dup = tmp_path / "dup.txt"
    dup.write_text("".join(f"{n},0\n" for n in names) + f"{names[0]},1\n")
    assert main(["evaluate", "--predictions", str(dup), "--labels", str(labels)]) == 2
    assert "duplicate prediction" in capsys.readouterr().err
    junk = tmp_path / "junk.txt"
    junk.write_text("img_0.png;3\n")
    assert main(["evaluate", "--predictions", str(junk), "--labels", str(labels)]) == 2
    assert "expected `img_N.png,<label>`" in capsys.readouterr().err


def test_bad_config_values(dataset, tmp_path, capsys):
    for sets, message in ((["train.lr=-1"], "train.lr"), (["train.schedule=zigzag"], "train.schedule"),
                          (["train.nope=1"], "unknown config key"), (["train.epochs=ten"], "must be a int"),
                          (["augment.flip=sideways"], "augment.flip"), (["train.tta=sideways"], "train.tta"),
                          (["train.init=pca"], "train.init"), (["train.lookahead=1"], "train.lookahead"),
                          (["train.grad_clip=-1"], "train.grad_clip"), (["train.grad_clip=nan"], "train.grad_clip")):
        assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), *sum((["--set", s] for s in sets), [])]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--preset", "nonesuch"]) == 2
    assert "preset not found" in capsys.readouterr().err


def test_annotate_labels_digits(dataset, tmp_path, capsys):
    copy = tmp_path / "course"
    shutil.copytree(dataset, copy)
    (copy / "metadata.csv").unlink()
    assert main(["data", "annotate", str(copy)]) == 0
    meta = pd.read_csv(copy / "metadata.csv")
    assert set(meta["split"]) == {"train", "val", "test"} and meta["digit"].between(0, 9).all()
    assert main(["data", "annotate", str(copy)]) == 2  # refuses to overwrite without --force
    assert "--force" in capsys.readouterr().err


def test_console_entry_point_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "shortcut_study.cli", "predict", "--checkpoint",
                           str(tmp_path / "none.pt"), "--images", str(tmp_path), "--out", str(tmp_path / "o.txt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_compiled_training_saves_plain_checkpoints(dataset, tmp_path):
    cfg = make_config(sets=["train.batch_size=32", "train.epochs=1", "train.eval_batch_size=64", "train.compile=true"])
    result = fit(cfg, dataset, tmp_path / "c", quiet=True)
    assert math.isfinite(result.history[0]["train_loss"])
    state = torch.load(tmp_path / "c" / "q1_model.pt", weights_only=True)
    CNN().load_state_dict(state)  # no torch.compile wrapper prefix in the saved names
