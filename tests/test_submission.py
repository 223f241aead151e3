"""The course's submission folder: every file the handout lists, code/ that runs without this
package (torch, torchvision, matplotlib, numpy, PIL and the standard library only), checkpoints that
load both ways, and one-line errors for a bad name, a run without a model, a short q1_test.txt."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys

import pytest
import torch

from shortcut_study.cli import main
from shortcut_study.model import CNN

ALLOWED = {"torch", "torchvision", "matplotlib", "numpy", "PIL", "data", "model"}
# Runs a script with this package made unimportable (`import shortcut_study` raises ImportError).
BLOCKED = "import runpy, sys; sys.modules['shortcut_study'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def _run(code_dir, *args):
    return subprocess.run([sys.executable, "-c", BLOCKED, *args], cwd=code_dir, capture_output=True, text=True,
                          timeout=600)


def test_submission_folder_runs_on_its_own(trained_run, dataset, tmp_path, capsys):
    assert main(["submission", "--name", "ada_lovelace", "--run", str(trained_run), "--data", str(dataset),
                 "--out", str(tmp_path)]) == 0
    folder = tmp_path / "ada_lovelace_project_2"
    assert sorted(p.name for p in (folder / "code").iterdir()) == ["data.py", "model.py", "q1.py", "q2.py", "q3.py"]
    assert sorted(p.name for p in (folder / "results").iterdir()) == ["q1_model.pt", "q1_test.txt", "report.pdf"]
    assert (folder / "results" / "report.pdf").read_bytes()[:4] == b"%PDF"
    assert len((folder / "results" / "q1_test.txt").read_text().splitlines()) == 30
    stdlib = set(sys.stdlib_module_names)
    for script in (folder / "code").glob("*.py"):
        tree = ast.parse(script.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert names <= ALLOWED | stdlib, (script.name, names - ALLOWED - stdlib)
        assert script.read_text().startswith('"""' + script.name)  # a header saying what it reproduces

    code = folder / "code"
    done = _run(code, "q1.py", "--data", str(dataset), "--epochs", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((code / "q1_test.txt").read_text().splitlines()) == 30
    theirs = torch.load(code / "q1_model.pt", weights_only=True)
    CNN().load_state_dict(theirs)  # their checkpoint loads into the package's CNN ...
    blocker = subprocess.run([sys.executable, "-c", BLOCKED.replace("runpy.run_path(sys.argv[0], run_name='__main__')",
                                                                    "import shortcut_study")],
                             capture_output=True, text=True)
    assert blocker.returncode != 0 and "import of shortcut_study halted" in blocker.stderr  # the blocker blocks
    # ... and the package's checkpoint into theirs
    shutil.copyfile(folder / "results" / "q1_model.pt", code / "ours.pt")
    done = _run(code, "q2.py", "--checkpoint", "ours.pt", "--out", "filters.png")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (code / "filters.png").read_bytes()[:4] == b"\x89PNG"
    done = _run(code, "q3.py", "--data", str(dataset), "--checkpoint", "q1_model.pt", "--out", "norms")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((code / "norms").glob("*.png"))) == 16 + 80


@pytest.mark.parametrize("name", ["ada", "ada lovelace", "../ada_lovelace", "ada_", "_ada"])
def test_a_bad_name_is_one_line(name, trained_run, dataset, tmp_path, capsys):
    assert main(["submission", "--name", name, "--run", str(trained_run), "--data", str(dataset),
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--name" in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_a_run_without_a_model_or_a_short_prediction_file_is_one_line(trained_run, dataset, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["submission", "--name", "ada_lovelace", "--results", str(empty), "--data", str(dataset),
                 "--out", str(tmp_path / "o")]) == 2
    assert "holds no q1_model.pt" in capsys.readouterr().err
    short = tmp_path / "short"
    shutil.copytree(trained_run, short)
    (short / "q1_test.txt").write_text("img_0.png,3\n")
    out = tmp_path / "o2"
    old = out / "ada_lovelace_project_2"
    old.mkdir(parents=True)
    (old / "keep.txt").write_text("the earlier folder")
    assert main(["submission", "--name", "ada_lovelace", "--run", str(short), "--data", str(dataset),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "q1_test.txt has 1 predictions for the 30 images" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["ada_lovelace_project_2"]  # no staging folder left
    assert (old / "keep.txt").read_text() == "the earlier folder"  # the earlier folder untouched
