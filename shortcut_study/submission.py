"""`submission`: the folder the course collects, `first_last_project_2/`, in one command.

    code/     model.py, data.py, q1.py, q2.py, q3.py — standalone (torch, torchvision, matplotlib,
              numpy, PIL and the standard library only), from the templates in `course_code/`:
              model.py is the package's own CNN source, data.py carries the handout's
              normalisation, q1.py the run's recipe written out as constants
    results/  q1_model.pt, q1_test.txt (one line per test image, the course's format), report.pdf

from a run folder (`--run DIR`, predicting the test set and making the report when missing) or from
an export (`--results DIR`, default `results/`). The folder is written whole into a staging folder
beside the destination and swapped in (`outputs.replace_folder`).
"""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

from .config import Config
from .errors import UserError, require_dir
from .outputs import replace_folder
from .run import MODEL_FILE, Run

TEMPLATES = Path(__file__).resolve().parent / "course_code"
CODE_FILES = ("model.py", "data.py", "q1.py", "q2.py", "q3.py")
RESULT_FILES = (MODEL_FILE, "q1_test.txt", "report.pdf")
NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(_[A-Za-z][A-Za-z0-9]*)+")


def folder_name(name: str) -> str:
    if not NAME.fullmatch(name or ""):
        raise UserError(f"--name {name!r}: give first_last (letters and digits, parts joined by '_'), "
                        "e.g. --name ada_lovelace")
    return f"{name}_project_2"


def model_source() -> str:
    """model.py: the package's CNN class, verbatim, with what it needs to stand alone."""
    from . import model

    return ('"""model.py — the required CNN of CSE 849 Project 2 (handout section 1.2, table 1): conv1 k7,\n'
            'conv2-conv5 k3, batch norm + ReLU after conv1-conv4, 2x2 max-pool after conv2-conv4, global\n'
            'average pooling, Linear(80, 10); 95,882 parameters. `forward(x, intermediate_outputs=True)`\n'
            'returns (logits, [conv1, ..., conv5 outputs]), the starter code\'s convention. Needs torch only.\n"""\n\n'
            "import torch\nfrom torch import nn\n\nNUM_CLASSES = 10\n\n\n" + inspect.getsource(model.CNN))


def recipe(cfg: Config) -> dict[str, object]:
    """The run's training recipe as q1.py's constants."""
    t, g = cfg.train, cfg.geometry
    if g.cifar_top + g.cifar_size > g.digit_top:
        raise UserError("the run's digit patch shares rows with the CIFAR image: the standalone q1.py shuffles the "
                        "digit strip below the CIFAR image — train on a layout with the digit below it")
    if t.optimizer != "sgd" or t.schedule != "cosine":
        raise UserError(f"the run trained with {t.optimizer} and a {t.schedule} schedule; the standalone q1.py writes out "
                        "SGD with a cosine schedule — export a run trained that way")
    return {"epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "momentum": t.momentum,
            "weight_decay": t.weight_decay, "warmup_epochs": t.warmup_epochs, "label_smoothing": t.label_smoothing,
            "grad_clip": t.grad_clip, "digit_shuffle": cfg.augment.digit_shuffle_p, "digit_top": g.digit_top, "seed": t.seed}


def code_files(cfg: Config) -> dict[str, str]:
    texts = {name: (TEMPLATES / name).read_text() for name in CODE_FILES if name != "model.py"}
    texts["model.py"] = model_source()
    fill = {"data.py": [("MEAN = None  # filled in by shortcut-study submission", f"MEAN = {list(cfg.geometry.mean)}"),
                        ("STD = None  # filled in by shortcut-study submission", f"STD = {list(cfg.geometry.std)}")],
            "q1.py": [("RECIPE = {}  # filled in by shortcut-study submission",
                       "RECIPE = " + _literal(recipe(cfg)) + "  # the submitted model's recipe")]}
    for name, pairs in fill.items():
        for old, new in pairs:
            assert old in texts[name], f"template {name} lost its placeholder"
            texts[name] = texts[name].replace(old, new)
    return texts


def _literal(d: dict[str, object]) -> str:
    return "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in d.items()) + "}"


def write_submission(name: str, out: str | Path | None = None, run: str | Path | None = None,
                     results: str | Path | None = None, data: str | Path = "data/course") -> Path:
    """Write OUT/first_last_project_2 (default OUT = the working directory); return its path."""
    from .data.layout import split_dir
    from .evaluate import predict_folder, read_predictions

    folder = Path(out or ".") / folder_name(name)
    source = Path(run) if run else Path(results or "results")
    require_dir(source, "run folder" if run else "results folder",
                "give --run DIR (a training run) or --results DIR (what `make best` exported)")
    if not (source / MODEL_FILE).is_file():
        raise UserError(f"{source} holds no {MODEL_FILE} — train a run (`make train`) or export one (`make best`)")
    cfg = Run(source).config()
    texts = code_files(cfg)
    test_dir = split_dir(Path(data), "test") if (Path(data) / "test_unlabeled").is_dir() or (Path(data) / "test").is_dir() else None
    with replace_folder(folder) as stage:
        (stage / "code").mkdir()
        (stage / "results").mkdir()
        for file, text in texts.items():
            (stage / "code" / file).write_text(text)
        shutil.copyfile(source / MODEL_FILE, stage / "results" / MODEL_FILE)
        predictions = stage / "results" / "q1_test.txt"
        if (source / "q1_test.txt").is_file():
            shutil.copyfile(source / "q1_test.txt", predictions)
        elif test_dir is not None:
            predict_folder(source / MODEL_FILE, test_dir, predictions)
        else:
            raise UserError(f"{source} has no q1_test.txt and {data} no test folder to predict — give --data DIR")
        _check_predictions(predictions, test_dir, read_predictions)
        if (source / "report.pdf").is_file():
            shutil.copyfile(source / "report.pdf", stage / "results" / "report.pdf")
        else:
            _make_report(source, data, stage / "results")
    return folder


def _check_predictions(path: Path, test_dir: Path | None, read_predictions) -> None:
    """One line per image of the test folder (when there is one), in the course's format."""
    preds = read_predictions(path)
    if test_dir is not None:
        images = sorted(p.name for p in test_dir.iterdir() if p.suffix.lower() == ".png")
        if len(preds) != len(images) or set(preds.index) != set(images):
            raise UserError(f"q1_test.txt has {len(preds)} predictions for the {len(images)} images of {test_dir} — "
                            "predict the test set again (`make predict`)")


def _make_report(source: Path, data: str | Path, out: Path) -> None:
    from .report import build_report

    scratch = out / ".report"
    build_report(source / MODEL_FILE, data, scratch, study=None)
    shutil.move(str(scratch / "report.pdf"), out / "report.pdf")
    shutil.rmtree(scratch)
