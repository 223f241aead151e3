"""Prediction (natural and crossed splits), scoring a model on a split, and grading a predictions
file. The metrics themselves are declared in `metrics.py`.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .augment import normalize
from .config import EVAL_BATCH_SIZE, NUM_CLASSES, NUM_DIGITS, Config, GeometryConfig
from .crossed import can_cross, crossed_views
from .data.layout import SplitData, read_images
from .errors import UserError, require_dir, require_file, require_writable, write_error, write_text_atomic
from .metrics import Scores, eval_metrics, format_metrics
from .model import CNN, folded_for_inference, load_model
from .registry import TTA
from .run import CONFIG_FILE, MODEL_FILE, Run
from .runtime import Runtime, resolve_runtime

RUBRIC = ((75.0, "≥ 75 % (20 pts)"), (70.0, "70–75 % (15 pts)"), (65.0, "65–70 % (10 pts)"),
          (60.0, "60–65 % (5 pts)"))


def _predictor(model: nn.Module, rt: Runtime) -> tuple[nn.Module, torch.dtype]:
    """The module that predicts for `model`, and its input dtype: on a CPU with bf16, the CNN with
    its batch norms folded and bf16 weights (`model.folded_for_inference`); else the model itself."""
    if isinstance(model, CNN) and rt.bf16 and rt.device.type == "cpu":
        folded = folded_for_inference(model, torch.bfloat16)
        return (folded.to(memory_format=torch.channels_last) if rt.channels_last else folded), torch.bfloat16
    return model, torch.float32


@torch.no_grad()
def predict_logits(model: nn.Module, images_u8: torch.Tensor, rt: Runtime, batch_size: int = EVAL_BATCH_SIZE,
                   tta: str = "none", geom: GeometryConfig | None = None) -> torch.Tensor:
    """Logits (N, 10) on the CPU for uint8 images. With test-time augmentation (`TTA`), the log of
    the views' mean softmax probability."""
    if tta not in TTA:
        raise UserError(f"unknown test-time augmentation {tta!r}: choose one of {', '.join(TTA.names())}")
    was_training = model.training
    model.eval()
    net, dtype = _predictor(model, rt)
    geom = geom or GeometryConfig()
    views = TTA[tta]
    out = []
    for start in range(0, len(images_u8), batch_size):
        x = normalize(images_u8[start:start + batch_size].to(rt.device), geom, dtype)
        with rt.autocast():
            if len(views) == 1:
                logits = net(rt.prepare(views[0](x, geom))).float()
            else:
                probs = sum(net(rt.prepare(view(x, geom))).float().softmax(1) for view in views)
                logits = (probs / len(views)).log()
        out.append(logits.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, NUM_CLASSES)


def crossed_predictions(model: nn.Module, split: SplitData, rt: Runtime, batch_size: int = EVAL_BATCH_SIZE,
                        geom: GeometryConfig | None = None, seed: int = 0) -> np.ndarray | None:
    """(N, NUM_DIGITS) predicted class of every image of `split` rendered with each digit d (the
    crossed split, `crossed.py`), one view each; None when `can_cross(split)` is false.

    One view, whatever `train.tta` says: ten renderings times 18 views would be 180 forward passes
    per image. Test-time views move only the CIFAR patch; the crossed metrics measure what the digit
    does, and every model is scored on them alike."""
    if not can_cross(split):
        return None
    geom = geom or GeometryConfig()
    out = np.empty((len(split), NUM_DIGITS), dtype=np.int64)
    for d, images in crossed_views(split, geom, seed):
        out[:, d] = predict_logits(model, images, rt, batch_size, "none", geom).argmax(1).numpy()
    return out


def confusion(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from sklearn.metrics import confusion_matrix  # here: seconds of imports, for this call only

    return confusion_matrix(labels, preds, labels=list(range(NUM_CLASSES)))


def score_split(model: nn.Module, split: SplitData, rt: Runtime, batch_size: int = EVAL_BATCH_SIZE, tta: str = "none",
                geom: GeometryConfig | None = None, crossed: bool = True,
                train_agreement: float = math.nan) -> Scores:
    """The model's predictions on `split` with `tta`'s views and, with `crossed` (where the split
    allows it), on its crossed version (one view): what every metric of `metrics.METRICS` is
    computed from."""
    preds = predict_logits(model, split.images, rt, batch_size, tta, geom).argmax(1).numpy()
    cross = crossed_predictions(model, split, rt, batch_size, geom) if crossed else None
    return Scores(preds, split.labels.numpy(), split.digits.numpy(), cross, train_agreement)


def evaluate_split(model: nn.Module, split: SplitData, rt: Runtime, batch_size: int = EVAL_BATCH_SIZE, tta: str = "none",
                   geom: GeometryConfig | None = None, crossed: bool = True,
                   train_agreement: float = math.nan) -> tuple[dict[str, float], np.ndarray]:
    """`eval_metrics` of the model on `split` (see `score_split`), and its predictions there."""
    scores = score_split(model, split, rt, batch_size, tta, geom, crossed, train_agreement)
    return eval_metrics(scores), scores.preds


def rubric_band(acc: float) -> str:
    for threshold, band in RUBRIC:
        if acc >= threshold:
            return band
    return "< 60 % (0 pts)"


def format_predictions(files: list[str], preds: np.ndarray) -> str:
    return "".join(f"{Path(f).name},{int(p)}\n" for f, p in zip(files, preds))


def predict_folder(checkpoint: str | Path, images: str | Path, out: str | Path, canvas: int | None = None,
                  device: str = "auto", tta: str = "auto") -> int:
    """Write `<file>,<label>` for every PNG in `images` (names sorted as strings); return the count.
    The run's own config (the config.json beside the checkpoint) gives the geometry and, with
    `tta="auto"`, the test-time augmentation."""
    require_writable(out)
    root = require_dir(images, "image folder", "pass --images DIR with the test PNGs")
    names = sorted(p.name for p in root.iterdir() if p.suffix.lower() == ".png")
    if not names:
        raise UserError(f"{root} holds no .png images — pass the folder with the test images")
    bad = [n for n in names if "," in n or not n.isprintable()]
    if bad:
        raise UserError(f"{root / bad[0]}: a comma or control character in the file name cannot be written "
                        "as `<file>,<label>` — rename it")
    rt = resolve_runtime(device)
    model, cfg = Run.of(checkpoint).load(rt.device, checkpoint)
    if canvas is not None and canvas != cfg.geometry.canvas:
        raise UserError(f"--canvas {canvas} differs from the run's geometry.canvas {cfg.geometry.canvas} "
                        f"(from {Run.of(checkpoint).config_path}) — drop --canvas")
    if tta == "auto":  # the run's own views; a bare checkpoint (no config.json) was trained without a record
        tta = cfg.train.tta if Run.of(checkpoint).config_path.is_file() else "none"
    try:
        x = torch.from_numpy(read_images(root, names, cfg.geometry.canvas))
    except UserError as exc:
        if "expected" not in str(exc) or not Run.of(checkpoint).config_path.is_file():
            raise
        raise UserError(f"{exc} — the run's {Run.of(checkpoint).config_path} says geometry.canvas="
                        f"{cfg.geometry.canvas}: predict images of the size the model was trained on") from None
    preds = predict_logits(model, x, rt, tta=tta, geom=cfg.geometry).argmax(1).numpy()
    write_text_atomic(out, format_predictions(names, preds))
    return len(names)


PREDICTIONS_FILE = "q1_test.txt"


def export_submission(checkpoint: str | Path, config: Config, test_images: str | Path, out: str | Path,
                      extra: dict[str, str] | None = None) -> int:
    """Write OUT/q1_model.pt, OUT/config.json (the run's configuration, so `predict` applies the same
    geometry and test-time augmentation), OUT/q1_test.txt and the `extra` text files as one unit:
    all are made in a staging folder first, and nothing in OUT changes unless every one succeeded."""
    out = require_writable(out, "folder")
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link: outputs are never written through one — give the folder itself")
    out.mkdir(parents=True, exist_ok=True)
    # A fresh staging folder of an unpredictable name (never an existing path followed).
    staging = Path(tempfile.mkdtemp(prefix=".export.", suffix=".partial", dir=out))
    try:
        run = Run(staging)
        run.save_model(load_model(checkpoint), config)
        n = predict_folder(run.model_path, test_images, staging / PREDICTIONS_FILE)
        for name, text in (extra or {}).items():
            write_text_atomic(staging / name, text)
        for name in (MODEL_FILE, CONFIG_FILE, PREDICTIONS_FILE, *(extra or {})):
            os.replace(staging / name, out / name)
    except OSError as exc:
        raise write_error(out, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return n


def read_predictions(path: str | Path) -> pd.Series:
    path = require_file(path, "predictions file", "run `shortcut-study predict` first")
    rows = {}
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark from an editor is not part of a name
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text — write it as `img_N.png,<label>` lines") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, label = (part.strip() for part in line.strip().partition(","))
        if not sep or not name or not label.lstrip("-").isdigit():
            raise UserError(f"{path}:{n}: expected `img_N.png,<label>`, got {line.strip()!r}")
        if name in rows:
            raise UserError(f"{path}:{n}: duplicate prediction for {name} — one line per image")
        if not 0 <= int(label) < NUM_CLASSES:
            raise UserError(f"{path}:{n}: label {label} is outside 0..9")
        rows[name] = int(label)
    return pd.Series(rows, dtype=np.int64)


def grade(predictions: str | Path, labels: str | Path) -> dict[str, float | str]:
    """Grade a predictions file against `test_labels.csv` (file,label[,digit])."""
    from .data.layout import read_table

    preds = read_predictions(predictions)
    path = require_file(labels, "labels file", "it is written by `shortcut-study data build` (test_labels.csv)")
    try:
        header = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a CSV ({str(exc).strip().splitlines()[0][:150]})") from None
    if not {"file", "label"} <= set(header):
        raise UserError(f"{path} needs columns file,label (got {', '.join(header)})")
    fix = "the labels file is written by `shortcut-study data build` (test_labels.csv)"
    truth = read_table(path, {"label": NUM_CLASSES, **({"digit": 10} if "digit" in header else {})}, fix)
    missing = sorted(set(truth["file"]) - set(preds.index))
    extra = sorted(set(preds.index) - set(truth["file"]))
    if missing:
        raise UserError(f"{predictions} has no prediction for {len(missing)} image(s), e.g. {missing[0]} "
                        "— predict every image of the test folder")
    if extra:
        raise UserError(f"{predictions} names {len(extra)} image(s) not in {path}, e.g. {extra[0]}")
    digits = truth["digit"].to_numpy() if "digit" in truth.columns else None
    # A predictions file holds one prediction per image: the natural-split metrics, no crossed ones.
    m: dict[str, float | str] = dict(eval_metrics(Scores(
        preds.loc[truth["file"]].to_numpy(), truth["label"].to_numpy(), digits)))
    m["band"] = rubric_band(float(m["acc"]))
    return m


def format_grade(m: dict[str, float | str]) -> str:
    """`grade`'s result: the metrics it holds, the image count and the rubric band."""
    return "\n".join([format_metrics(m), f"images  {int(m['n'])}", f"rubric band  {m['band']}"])
