"""Bad input, table-driven: every case exits 2 with exactly one `error:` line on stderr, no
traceback, and leaves every file as it was. One or more cases per class of failure (issue 16)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from shortcut_study.cli import main
from shortcut_study.model import CNN, plain_state_dict


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.parts}


@pytest.fixture
def world(dataset, trained_run, tmp_path) -> dict[str, Path]:
    """A private copy of the dataset and the run, and a file to put paths under."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(dataset, data)
    shutil.copytree(trained_run, run)
    (tmp_path / "afile").write_text("x")
    preds = tmp_path / "preds.txt"
    assert main(["predict", "--checkpoint", str(run / "q1_model.pt"), "--images", str(data / "test_unlabeled"),
                 "--out", str(preds)]) == 0
    return {"root": tmp_path, "data": data, "run": run, "afile": tmp_path / "afile", "preds": preds}


def _edit_csv(path: Path, column: str, value: str, row: int = 0) -> None:
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[row, column] = value
    df.to_csv(path, index=False)


def _malicious(marker: Path) -> object:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Payload()


# Each case: (id, setup(world) -> argv, fragment the one error line must hold)
Case = tuple[str, Callable[[dict[str, Path]], list[str]], str]


def _oracle_crafted(w):
    torch.save({"x": _malicious(w["root"] / "pwned")}, w["root"] / "oracle.pt")
    (w["data"] / "metadata.csv").unlink()
    return ["data", "annotate", str(w["data"]), "--oracle", str(w["root"] / "oracle.pt")]


def _digit(value):
    def setup(w):
        _edit_csv(w["data"] / "metadata.csv", "digit", value)
        return ["train", "--data", str(w["data"]), "--out", str(w["root"] / "new"), "--epochs", "1"]
    return setup


def _label(value):
    def setup(w):
        _edit_csv(w["data"] / "test_labels.csv", "label", value)
        return ["evaluate", "--predictions", str(w["preds"]), "--labels", str(w["data"] / "test_labels.csv")]
    return setup


def _labels_missing_column(w):
    (w["root"] / "labels.csv").write_text("file,klass\nimg_0.png,1\n")
    return ["evaluate", "--predictions", str(w["preds"]), "--labels", str(w["root"] / "labels.csv")]


def _labels_duplicate_row(w):
    path = w["data"] / "test_labels.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[1]]) + "\n")
    return ["evaluate", "--predictions", str(w["preds"]), "--labels", str(path)]


def _preds_not_utf8(w):
    w["preds"].write_bytes(b"img_0.png,\xff\xfe\n")
    return ["evaluate", "--predictions", str(w["preds"]), "--labels", str(w["data"] / "test_labels.csv")]


def _last(content):
    def setup(w):
        torch.save(content(w), w["run"] / "last.pt")
        return ["train", "--data", str(w["data"]), "--out", str(w["run"]), "--resume"]
    return setup


def _nan_checkpoint(w):
    state = plain_state_dict(CNN())
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, w["root"] / "nan.pt")
    return ["predict", "--checkpoint", str(w["root"] / "nan.pt"), "--images", str(w["data"] / "test_unlabeled"),
            "--out", str(w["root"] / "p.txt")]


def _image_named(name: bytes):
    def setup(w):
        images = w["root"] / "imgs"
        shutil.copytree(w["data"] / "test_unlabeled", images)
        Image.new("RGB", (40, 40)).save(os.fsdecode(bytes(images) + b"/" + name))
        return ["predict", "--checkpoint", str(w["run"] / "q1_model.pt"), "--images", str(images),
                "--out", str(w["root"] / "p.txt")]
    return setup


def _bad_tta_beside_checkpoint(w):
    tree = json.loads((w["run"] / "config.json").read_text())
    tree["train"]["tta"] = "sideways"
    tree.pop("_model_sha256", None)
    (w["run"] / "config.json").write_text(json.dumps(tree))
    return ["predict", "--checkpoint", str(w["run"] / "q1_model.pt"), "--images", str(w["data"] / "test_unlabeled"),
            "--out", str(w["root"] / "p.txt")]


def _garbage_archive(w):
    (w["root"] / "junk.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 50)
    return ["data", "build", "--cifar", str(w["root"] / "junk.tar.gz"), "--mnist", str(w["root"] / "junk.tar.gz"),
            "--out", str(w["root"] / "built")]


def _report(extra, history=None):
    def setup(w):
        if history is not None:
            (w["root"] / "h.csv").write_text(history)
            extra.extend(["--history", str(w["root"] / "h.csv")])
        return ["report", "--checkpoint", str(w["run"] / "q1_model.pt"), "--data", str(w["data"]),
                "--out", str(w["root"] / "results"), "--study", "", *extra]
    return setup


def _config_json(text):
    def setup(w):
        (w["run"] / "config.json").write_text(text)
        return ["predict", "--checkpoint", str(w["run"] / "q1_model.pt"), "--images",
                str(w["data"] / "test_unlabeled"), "--out", str(w["root"] / "p.txt")]
    return setup


def _state_edit(edit):
    def content(w):
        state = torch.load(w["run"] / "last.pt", weights_only=True)
        edit(state)
        return state
    return _last(content)


def _best_run_json(text):
    def setup(w):
        out = w["root"] / "results"
        out.mkdir()
        shutil.copyfile(w["run"] / "q1_model.pt", out / "q1_model.pt")
        (out / "best_run.json").write_text(text)
        return ["report", "--data", str(w["data"]), "--out", str(out), "--study", ""]
    return setup


def _nan_oracle(w):
    from shortcut_study.data.oracle import DigitOracle

    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in DigitOracle().state_dict().items()}
    torch.save(state, w["root"] / "nan_oracle.pt")
    return ["data", "annotate", str(w["data"]), "--force", "--oracle", str(w["root"] / "nan_oracle.pt")]


def _out_symlink(w):
    (w["root"] / "link").symlink_to(w["data"], target_is_directory=True)
    return ["data", "build", "--cifar", str(w["data"]), "--mnist", str(w["data"]), "--out", str(w["root"] / "link")]


def _train(*sets):
    return lambda w: ["train", "--data", str(w["data"]), "--out", str(w["root"] / "new"), "--epochs", "1",
                      *sum((["--set", s] for s in sets), [])]


def _report_bad_test_labels(w):
    _edit_csv(w["data"] / "test_labels.csv", "label", "cat")
    return ["report", "--checkpoint", str(w["run"] / "q1_model.pt"), "--data", str(w["data"]),
            "--out", str(w["root"] / "results"), "--study", ""]


CASES: list[Case] = [
    # 1. no code runs from a checkpoint
    ("crafted oracle", _oracle_crafted, "digit oracle"),
    ("crafted last.pt", _last(lambda w: {"model": _malicious(w["root"] / "pwned")}), "cannot resume"),
    # 2. one line instead of a traceback
    ("build --out under a file", lambda w: ["data", "build", "--cifar", "x", "--mnist", "y", "--out",
                                            str(w["afile"] / "sub")], "is a file"),
    ("train --out is a file", lambda w: ["train", "--data", str(w["data"]), "--out", str(w["afile"])], "is a file"),
    ("predict --out is a folder", lambda w: ["predict", "--checkpoint", str(w["run"] / "q1_model.pt"), "--images",
                                             str(w["data"] / "test_unlabeled"), "--out", str(w["data"])], "is a folder"),
    ("oracle --out under a file", lambda w: ["data", "oracle", "--mnist", "x", "--out", str(w["afile"] / "o.pt")],
     "is a file"),
    ("bench --md under a file", lambda w: ["bench", "--data", str(w["data"]), "--quick", "--md",
                                           str(w["afile"] / "b.md")], "is a file"),
    ("journal under a file", lambda w: ["sweep", "--data", str(w["data"]), "--storage", str(w["afile"] / "s.journal"),
                                        "--tracking-uri", f"sqlite:///{w['root']}/m.db"], "is a file"),
    ("metadata digit not an integer", _digit("seven"), "digit 'seven'"),
    ("metadata digit empty", _digit(""), "digit ''"),
    ("labels missing columns", _labels_missing_column, "needs columns file,label"),
    ("label not an integer", _label("cat"), "label 'cat'"),
    ("predictions not UTF-8", _preds_not_utf8, "not UTF-8"),
    ("last.pt a plain state_dict", _last(lambda w: plain_state_dict(CNN())), "not a shortcut-study training state"),
    ("device cudaXYZ", lambda w: ["train", "--data", str(w["data"]), "--out", str(w["root"] / "new"), "--set",
                                 "train.device=cudaXYZ"], "train.device"),
    ("image name not UTF-8", _image_named(b"img_\xff.png"), "rename it"),
    # 3. outputs are written as one unit or not at all
    ("report bad --layers", _report(["--layers", "conv9"]), "--layers"),
    ("report history without epochs", _report([], history="a,b\n1,2\n"), "lacks the column"),
    # 5. bad input that used to be accepted
    ("oracle --epochs 0", lambda w: ["data", "oracle", "--mnist", "x", "--out", str(w["root"] / "o.pt"),
                                     "--epochs", "0"], "--epochs must be >= 1"),
    ("metadata digit 42", _digit("42"), "digit '42'"),
    ("all-NaN checkpoint", _nan_checkpoint, "NaN"),
    ("labels duplicated row", _labels_duplicate_row, "listed twice"),
    ("label 12", _label("12"), "label '12'"),
    ("label empty", _label(""), "label ''"),
    ("image name with a comma", _image_named(b"img,5.png"), "comma"),
    ("bench --steps 0", lambda w: ["bench", "--data", str(w["data"]), "--quick", "--steps", "0"], "--steps"),
    ("bench --steps -1", lambda w: ["bench", "--data", str(w["data"]), "--quick", "--steps", "-1"], "--steps"),
    # 6. messages that name the right thing, on one line
    ("digit_size 100", lambda w: ["train", "--data", str(w["data"]), "--out", str(w["root"] / "new"), "--set",
                                  "geometry.digit_size=100"], "geometry.digit_size"),
    ("noise sigma inf", lambda w: ["train", "--data", str(w["data"]), "--out", str(w["root"] / "new"), "--set",
                                   "augment.noise_sigma=inf"], "augment.noise_sigma"),
    ("predict --canvas 0", lambda w: ["predict", "--checkpoint", str(w["run"] / "q1_model.pt"), "--images",
                                      str(w["data"] / "test_unlabeled"), "--out", str(w["root"] / "p.txt"),
                                      "--canvas", "0"], "--canvas"),
    ("bad tta in the run's config.json", _bad_tta_beside_checkpoint, "config.json"),
    ("garbage archive", _garbage_archive, "truncated or corrupt"),
    ("argparse error", lambda w: ["train", "--data", str(w["data"])], "--out"),
    # 7. round two (issue 25; ids of ../shared/reviews/bad-inputs-2026-12.md)
    ("Q05 config.json a list nested 100,000 deep", _config_json("[" * 100_000 + "]" * 100_000), "nested too deep"),
    ("Q06 config.json an object nested 100,000 deep", _config_json('{"a":' * 100_000 + "1" + "}" * 100_000),
     "nested too deep"),
    ("Q25 last.pt without best_score", _state_edit(lambda s: s.pop("best_score")), "no 'best_score'"),
    ("Q26 last.pt method a string", _state_edit(lambda s: s.update(method="erm")), "'method' is a str"),
    ("Q27 last.pt config a list", _state_edit(lambda s: s.update(config=[1, 2, 3])), "'config' is a list"),
    ("Q28 last.pt epoch a string", _state_edit(lambda s: s.update(epoch="one")), "'epoch' is a str"),
    ("Q29 last.pt history a string", _state_edit(lambda s: s.update(history="nope")), "'history' is a str"),
    ("Q31 best_run.json not JSON", _best_run_json("{nope"), "best_run.json"),
    ("Q32 best_run.json a list", _best_run_json("[1]"), "best_run.json"),
    ("Q20 oracle with NaN weights", _nan_oracle, "NaN"),
    ("G02 a 20-digit seed", _train("train.seed=99999999999999999999"), "train.seed"),
    ("G03 build --seed -1", lambda w: ["data", "build", "--cifar", str(w["data"]), "--mnist", str(w["data"]),
                                       "--out", str(w["root"] / "b"), "--seed", "-1"], "build.seed"),
    ("G05 batch size 1", _train("train.batch_size=1"), "train.batch_size"),
    ("M20 upweight 1e308", _train("train.method=jtt", "method.upweight=1e308"), "method.upweight"),
    ("M19 eta 1e308", _train("train.method=groupdro", "method.eta=1e308"), "method.eta"),
    ("G08 sweep --study ../escape", lambda w: ["sweep", "--data", str(w["data"]), "--study", "../escape",
                                              "--storage", f"sqlite:///{w['root']}/s.db",
                                              "--tracking-uri", f"sqlite:///{w['root']}/m.db"], "--study"),
    ("N10 bench --presets nosuch before any row", lambda w: ["bench", "--data", str(w["data"]), "--presets", "nosuch",
                                                             "--steps", "1"], "preset not found: nosuch"),
    ("T34 report with a bad test_labels.csv", _report_bad_test_labels, "label 'cat'"),
    ("L04 build --out a symbolic link", _out_symlink, "symbolic link"),
    ("U14 two sweep workers on a closed database", lambda w: [
        "sweep", "--data", str(w["data"]), "--study", "u14", "--workers", "2",
        "--storage", "postgresql://postgres@127.0.0.1:9/optuna", "--tracking-uri", f"sqlite:///{w['root']}/m.db"],
     "cannot reach storage"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, world, capsys):
    _, setup, fragment = case
    argv = setup(world)
    before = _snapshot(world["root"])
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and fragment in err, err
    assert _snapshot(world["root"]) == before  # nothing created or changed
    assert not (world["root"] / "pwned").exists()


def test_good_variants_of_bad_looking_input_work(world, capsys):
    """A byte-order mark and spaces around the comma are read; a PNG changed in place at the same
    size is noticed by the cache."""
    text = world["preds"].read_text()
    world["preds"].write_text("\ufeff" + text.replace(",", " , "))
    assert main(["evaluate", "--predictions", str(world["preds"]), "--labels",
                 str(world["data"] / "test_labels.csv")]) == 0
    from shortcut_study.data import load_split

    before = load_split(world["data"], "val")
    first = world["data"] / before.files[0]
    Image.new("RGB", (40, 40), (255, 0, 0)).save(first)
    after = load_split(world["data"], "val")
    assert not torch.equal(after.images[0], before.images[0])


def test_a_failed_export_leaves_the_previous_one_whole(world):
    """`best` / the bench export the model, its config, the predictions and best_run.json as one
    unit: an empty test folder fails before anything in the results folder changes."""
    from shortcut_study.errors import UserError
    from shortcut_study.evaluate import export_submission
    from shortcut_study.run import Run

    out = world["root"] / "results"
    run = Run(world["run"])
    export_submission(run.model_path, run.config(), world["data"] / "test_unlabeled", out, extra={"best_run.json": "{}"})
    before = _snapshot(out)
    empty = world["root"] / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no .png"):
        export_submission(run.model_path, run.config(), empty, out, extra={"best_run.json": '{"new": 1}'})
    assert _snapshot(out) == before and not (out / ".export.partial").exists()


# ---- round two (issue 25): planted links, interrupted swaps, full disks, silent servers ---------------

def test_planted_staging_links_are_never_followed(world, sources):
    """L06 / L08: a symlink at the old predictable staging names beside an output is ignored."""
    from shortcut_study.evaluate import export_submission
    from shortcut_study.run import Run

    other = world["root"] / "other"
    other.mkdir()
    (other / "q1_model.pt").write_text("someone else's")
    out = world["root"] / "results"
    out.mkdir()
    (out / ".export.partial").symlink_to(other, target_is_directory=True)
    run = Run(world["run"])
    export_submission(run.model_path, run.config(), world["data"] / "test_unlabeled", out)
    assert (other / "q1_model.pt").read_text() == "someone else's" and sorted(p.name for p in other.iterdir()) == ["q1_model.pt"]
    built = world["root"] / "built"
    (world["root"] / ".built.partial").symlink_to(other, target_is_directory=True)
    assert main(["data", "build", "--cifar", str(sources["cifar_tgz"]), "--mnist", str(sources["mnist_tgz"]),
                 "--out", str(built), "--set", "build.train_size=60", "--set", "build.val_size=20",
                 "--set", "build.test_size=10"]) == 0
    assert built.is_dir() and not built.is_symlink() and sorted(p.name for p in other.iterdir()) == ["q1_model.pt"]


def test_an_interrupted_replacement_leaves_the_old_folder_whole(tmp_path):
    """I02: the new set is staged whole and swapped in; Ctrl-C before the swap leaves the old set."""
    from shortcut_study.outputs import replace_folder

    dest = tmp_path / "ds"
    dest.mkdir()
    (dest / "metadata.csv").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with replace_folder(dest) as stage:
            (stage / "metadata.csv").write_text("new")
            raise KeyboardInterrupt
    assert (dest / "metadata.csv").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with replace_folder(dest) as stage:
        (stage / "metadata.csv").write_text("new")
    assert (dest / "metadata.csv").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.fixture
def tiny_disk(tmp_path, request):
    """A small tmpfs (1 MB, or the size the test asks for with `@pytest.mark.disk("4m")`) as root;
    skipped, saying why, where it cannot be mounted."""
    import subprocess

    marker = request.node.get_closest_marker("disk")
    size = marker.args[0] if marker else "1m"
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()[:100]}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_naming_the_path(world, tiny_disk, capsys):
    """F02 / T28: train into a disk too small for its run folder."""
    (tiny_disk / "filler").write_bytes(b"\0" * 700_000)
    out = tiny_disk / "run"
    code = main(["train", "--data", str(world["data"]), "--out", str(out), "--epochs", "1",
                 "--set", "train.batch_size=32", "--set", "augment.digit_shuffle_p=0"])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]  # after the progress bar
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "disk is full" in errors[0] and str(tiny_disk) in errors[0], err
    assert not [p for p in tiny_disk.rglob("*.tmp")]  # no half-written file left


@pytest.mark.disk("4m")
def test_a_retrain_on_a_full_disk_leaves_the_earlier_run_whole(world, tiny_disk, capsys):
    """T28: an earlier good run on a disk with too little room for a second; retraining into it
    fails with one line and leaves every file of the earlier run as it was, nothing beside it."""
    out = tiny_disk / "run"
    shutil.copytree(world["run"], out)
    before = _snapshot(out)
    free = shutil.disk_usage(tiny_disk).free
    (tiny_disk / "filler").write_bytes(b"\0" * max(free - 300_000, 0))
    code = main(["train", "--data", str(world["data"]), "--out", str(out), "--epochs", "1",
                 "--set", "train.batch_size=32", "--set", "augment.digit_shuffle_p=0"])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "disk is full" in errors[0] and "Traceback" not in err, err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "run"]


def test_a_silent_database_is_a_timeout_not_a_hang(world, capsys):
    """U06: a PostgreSQL port that accepts connections and never answers."""
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    start = time.monotonic()
    try:
        code = main(["sweep", "--data", str(world["data"]), "--study", "u06", "--n-trials", "1",
                     "--storage", f"postgresql://postgres@127.0.0.1:{port}/optuna",
                     "--tracking-uri", f"sqlite:///{world['root']}/m.db"])
    finally:
        listener.close()
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot reach storage" in err and len(err.splitlines()) == 1, err
    assert time.monotonic() - start < 60


def test_a_grid_is_checked_against_each_cells_method(tmp_path):
    """K30 / K31 / K32 / K33 / K34: method hyperparameters in a grid's recipe are checked against the
    cell's method; values the axes set may not be set by the recipe too."""
    from shortcut_study.compare import load_grid
    from shortcut_study.errors import UserError

    def grid(methods, recipe):
        path = tmp_path / "g.toml"
        path.write_text(f'name = "g"\nmethods = {methods}\nagreements = [0.64]\ndigit_sizes = [16]\nseeds = [0]\n'
                        f'preset = "methods"\n{recipe}')
        return path

    ok = load_grid(grid('["groupdro"]', "[recipe.method]\neta = 0.05\n"))  # K30: valid, accepted
    assert ok.cell_config(ok.cells[0]).method["eta"] == 0.05
    with pytest.raises(UserError, match="cell erm .*method erm has"):  # K32: the middle cell is checked too
        load_grid(grid('["groupdro", "erm", "groupdro+shuffle"]', "[recipe.method]\neta = 0.05\n"))
    with pytest.raises(UserError, match="cell groupdro .*method.upweight.*method groupdro has"):  # K31
        load_grid(grid('["jtt", "groupdro"]', "[recipe.method]\nupweight = 5\n"))
    with pytest.raises(UserError, match="geometry.digit_size, which its axes decide"):  # K33
        load_grid(grid('["erm"]', "[recipe.geometry]\ndigit_size = 8\n"))
    with pytest.raises(UserError, match="train.method, train.seed, which its axes decide"):  # K34
        load_grid(grid('["erm"]', '[recipe.train]\nmethod = "jtt"\nseed = 7\n'))


def test_ctrl_c_at_any_moment_of_a_rebuild_leaves_the_old_or_the_new_dataset_whole(sources, tmp_path):
    """I02 through the CLI: `data build` over an existing dataset, SIGINT at moments spread over the
    whole command (start-up, building, the swap): the folder holds every file of the old dataset or
    every file of the new one, byte for byte, and nothing is left beside it."""
    import hashlib
    import signal
    import subprocess
    import sys
    import time

    def build(out: Path, seed: int) -> list[str]:
        return [sys.executable, "-m", "shortcut_study.cli", "data", "build", "--cifar", str(sources["cifar_tgz"]),
                "--mnist", str(sources["mnist_tgz"]), "--out", str(out), "--seed", str(seed),
                "--set", "build.train_size=60", "--set", "build.val_size=20", "--set", "build.test_size=10"]

    def files(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    refs = tmp_path / "refs"
    subprocess.run(build(refs / "old", 1), check=True, capture_output=True)
    subprocess.run(build(refs / "new", 2), check=True, capture_output=True)
    start = time.monotonic()  # timed warm, as the interrupted builds below run (a cold first build is slower)
    subprocess.run(build(refs / "again", 2), check=True, capture_output=True)
    took = time.monotonic() - start
    old, new = files(refs / "old"), files(refs / "new")
    assert old != new
    seen = set()
    # Interrupts at moments spread over the command, and one the moment its staging folder appears
    # (the dataset is written there, then swapped in): whichever side of the swap each lands on,
    # the folder is one whole dataset. Which side is the machine's timing, so it is not asserted.
    for i, fraction in enumerate((None, 0.2, 0.45, 0.7, 0.85, 0.95)):
        area = tmp_path / f"run{i}"
        area.mkdir()
        shutil.copytree(refs / "old", area / "ds")
        proc = subprocess.Popen(build(area / "ds", 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if fraction is None:
            deadline = time.monotonic() + 120
            while not list(area.glob(".ds.*")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
        else:
            time.sleep(took * fraction)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, err
        got = files(area / "ds")
        assert got in (old, new), f"SIGINT at {fraction}: neither the old nor the new dataset"
        assert sorted(p.name for p in area.iterdir()) == ["ds"]  # no staging folder left
        seen.add("new" if got == new else "old")


class _InterruptsWhenNamed:
    def __set_name__(self, owner, name):
        raise KeyboardInterrupt


def _interrupted_import(*_: object) -> float:
    """Ctrl-C landing while a class body is created, as during `import torchvision`."""
    class Library:  # noqa: F841 (its creation is the point)
        field = _InterruptsWhenNamed()
    return 0.0


def test_ctrl_c_during_an_import_is_an_interruption_not_a_traceback(monkeypatch, capsys):
    """Ctrl-C that lands while a class body is being created (as during `import torchvision`):
    Python 3.11 re-raises it from `__set_name__` as a RuntimeError caused by the interrupt.
    The command still says `interrupted` and exits 130; any other RuntimeError stays a bug."""
    import shortcut_study.cli as cli

    monkeypatch.setattr(cli, "cmd_data_build", _interrupted_import)
    assert main(["data", "build", "--cifar", "c", "--mnist", "m", "--out", "x"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err

    def a_bug(args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(cli, "cmd_data_build", a_bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["data", "build", "--cifar", "c", "--mnist", "m", "--out", "x"])


def test_ctrl_c_wrapped_during_a_trial_stops_the_worker(tmp_path):
    """The same wrapped Ctrl-C inside a trial (a cell imports torchvision to build its data) stops
    the worker and fails the trial, as a plain Ctrl-C does; it is not a failed trial to move past."""
    import math

    import optuna
    from optuna.trial import TrialState

    from shortcut_study.storage import ClaimLock, open_storage
    from shortcut_study.trials import WorkerSettings, run_shared_trials

    url = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    settings = WorkerSettings(experiment_id="0", heartbeat=60, grace=120, deadline=math.inf, storage=url)
    with pytest.raises(KeyboardInterrupt):
        run_shared_trials(study, ClaimLock(url, "s"), lambda st: st.ask() if not st.trials else None,
                          _interrupted_import, settings, after_trial=lambda t: None)
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def _fill(disk: Path, leave: int) -> None:
    (disk / "filler").write_bytes(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))


def _one_error_line(capsys, code: int, disk: Path) -> None:
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "disk is full" in errors[0] and str(disk) in errors[0], err
    assert "Traceback" not in err


def test_best_on_a_full_disk_is_one_line_and_leaves_no_export(world, tiny_disk, capsys):
    """F04: `best` exports into a disk with room for less than the model."""
    store = world["root"] / "st"
    common = ["--study", "fd", "--storage", f"sqlite:///{store}/o.db", "--tracking-uri", f"sqlite:///{store}/m.db"]
    assert main(["sweep", "--data", str(world["data"]), "--n-trials", "1", "--epochs", "1", "--subset", "0",
                 "--set", "train.batch_size=32", "--set", "train.tta=none", *common]) == 0
    capsys.readouterr()
    _fill(tiny_disk, 200_000)
    _one_error_line(capsys, main(["best", "--data", str(world["data"]), "--out", str(tiny_disk / "res"), *common]), tiny_disk)
    res = tiny_disk / "res"
    assert sorted(p.name for p in tiny_disk.iterdir()) in (["filler"], ["filler", "res"])
    assert not res.exists() or not list(res.iterdir())  # no half export, no staging left


def test_compare_on_a_full_disk_keeps_the_earlier_tables_whole(sources, tmp_path, tiny_disk, capsys):
    """F09 / F10: a finished comparison's tables and plots rewritten into a full disk."""
    grid = tmp_path / "g.toml"
    grid.write_text('name = "fd"\nmethods = ["erm"]\nagreements = [0.9]\ndigit_sizes = [16]\nseeds = [0]\n'
                    'preset = "methods"\n[recipe.train]\nepochs = 1\nbatch_size = 32\neval_batch_size = 64\n'
                    'tta = "none"\n[recipe.build]\ntrain_size = 120\nval_size = 40\ntest_size = 30\n')
    args = ["compare", "--grid", str(grid), "--cifar", str(sources["cifar_tgz"]), "--mnist", str(sources["mnist_tgz"]),
            "--storage", f"sqlite:///{tmp_path}/o.db", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
            "--data-root", str(tmp_path / "data")]
    out = tiny_disk / "cres"
    assert main([*args, "--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    _fill(tiny_disk, 5_000)
    _one_error_line(capsys, main([*args, "--out", str(out), "--aggregate"]), tiny_disk)
    assert _snapshot(out) == before
