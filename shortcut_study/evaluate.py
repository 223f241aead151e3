"""Metrics, prediction and grading.

Shortcut-aware metrics: besides accuracy, accuracy on digit-aligned images (digit == label) and on
digit-conflicting ones, the worst class and the worst (class, aligned) group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from .augment import flip_patch, normalize, shift_patch
from .config import NUM_CLASSES, Config, GeometryConfig
from .data.layout import SplitData, read_images
from .errors import UserError, atomic_path, require_dir, require_file, write_text_atomic
from .model import load_model
from .runtime import Runtime, resolve_runtime

RUBRIC = ((75.0, "≥ 75 % (20 pts)"), (70.0, "70–75 % (15 pts)"), (65.0, "65–70 % (10 pts)"),
          (60.0, "60–65 % (5 pts)"))


View = Callable[[torch.Tensor, GeometryConfig], torch.Tensor]


def _identity(x: torch.Tensor, geom: GeometryConfig) -> torch.Tensor:
    return x


def _shifted_views(flipped: bool) -> list[View]:
    return [(lambda x, g, dy=dy, dx=dx: shift_patch(flip_patch(x, g) if flipped else x, g, dy, dx))
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


# Test-time augmentation: name -> the views whose softmax probabilities are averaged. Views move
# or mirror the CIFAR patch only: the digit stays where the test set has it.
TTA: dict[str, list[View]] = {
    "none": [_identity],
    "flip": [_identity, flip_patch],
    "flip_shift": _shifted_views(False) + _shifted_views(True),
}
# Per-epoch model selection uses this cheap setting when a costlier one is configured.
MONITOR_TTA = "flip"


def monitor_tta(tta: str) -> str:
    return tta if len(TTA[tta]) <= len(TTA[MONITOR_TTA]) else MONITOR_TTA


@torch.no_grad()
def predict_logits(model: nn.Module, images_u8: torch.Tensor, rt: Runtime, batch_size: int = 1024,
                   tta: str = "none", geom: GeometryConfig | None = None) -> torch.Tensor:
    """Logits (N, 10) on the CPU for uint8 images. With test-time augmentation (`TTA`), the log of
    the views' mean softmax probability."""
    if tta not in TTA:
        raise UserError(f"unknown test-time augmentation {tta!r}: choose one of {', '.join(TTA)}")
    was_training = model.training
    model.eval()
    geom = geom or GeometryConfig()
    views = TTA[tta]
    out = []
    for start in range(0, len(images_u8), batch_size):
        x = normalize(images_u8[start:start + batch_size].to(rt.device))
        with rt.autocast():
            if len(views) == 1:
                logits = model(rt.prepare(views[0](x, geom))).float()
            else:
                probs = sum(model(rt.prepare(view(x, geom))).float().softmax(1) for view in views)
                logits = (probs / len(views)).log()
        out.append(logits.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, NUM_CLASSES)


def _acc(correct: np.ndarray) -> float:
    return float(correct.mean() * 100) if len(correct) else math.nan


def classification_metrics(preds: np.ndarray, labels: np.ndarray, digits: np.ndarray | None = None) -> dict[str, float]:
    """Accuracies in percent; aligned / conflicting / worst-group need known digits (>= 0)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    correct = preds == labels
    per_class = [_acc(correct[labels == c]) for c in range(NUM_CLASSES) if (labels == c).any()]
    m = {"acc": _acc(correct), "worst_class_acc": min(per_class) if per_class else math.nan,
         "n": float(len(labels))}
    if digits is not None and len(digits) and (np.asarray(digits) >= 0).all():
        aligned = np.asarray(digits) == labels
        m["aligned_acc"] = _acc(correct[aligned])
        m["conflicting_acc"] = _acc(correct[~aligned])
        groups = [_acc(correct[(labels == c) & (aligned == a)])
                  for c in range(NUM_CLASSES) for a in (True, False) if ((labels == c) & (aligned == a)).any()]
        m["worst_group_acc"] = min(groups)
        m["aligned_fraction"] = float(aligned.mean() * 100)
    return m


def gap_interval(m: dict[str, float]) -> tuple[float, float]:
    """Aligned minus conflicting accuracy and the half-width of its 95 % normal interval (points)."""
    n_al = m["n"] * m["aligned_fraction"] / 100
    n_co = m["n"] - n_al
    pa, pc = m["aligned_acc"] / 100, m["conflicting_acc"] / 100
    se = math.sqrt(pa * (1 - pa) / max(n_al, 1) + pc * (1 - pc) / max(n_co, 1)) * 100
    return m["aligned_acc"] - m["conflicting_acc"], 1.96 * se


def confusion(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return confusion_matrix(labels, preds, labels=list(range(NUM_CLASSES)))


def evaluate_split(model: nn.Module, split: SplitData, rt: Runtime, batch_size: int = 1024,
                   tta: str = "none", geom: GeometryConfig | None = None) -> tuple[dict[str, float], np.ndarray]:
    preds = predict_logits(model, split.images, rt, batch_size, tta, geom).argmax(1).numpy()
    return classification_metrics(preds, split.labels.numpy(), split.digits.numpy()), preds


def rubric_band(acc: float) -> str:
    for threshold, band in RUBRIC:
        if acc >= threshold:
            return band
    return "< 60 % (0 pts)"


def format_predictions(files: list[str], preds: np.ndarray) -> str:
    return "".join(f"{Path(f).name},{int(p)}\n" for f, p in zip(files, preds))


def run_tta(checkpoint: str | Path) -> str:
    """The test-time augmentation a run was trained and selected with: `train.tta` of the
    config.json beside its checkpoint ("none" for a bare checkpoint)."""
    config = Path(checkpoint).with_name("config.json")
    if not config.is_file():
        return "none"
    try:
        return Config.from_dict(json.loads(config.read_text())).train.tta
    except (ValueError, AttributeError) as exc:
        raise UserError(f"{config} is not a run config ({exc}): pass --tta explicitly or remove it") from None


def predict_folder(checkpoint: str | Path, images: str | Path, out: str | Path, canvas: int = 40,
                   device: str = "auto", tta: str = "auto") -> int:
    """Write `<file>,<label>` for every PNG in `images` (names sorted as strings); return the count.
    `tta="auto"` uses the run's own setting (`run_tta`)."""
    root = require_dir(images, "image folder", "pass --images DIR with the test PNGs")
    names = sorted(p.name for p in root.iterdir() if p.suffix.lower() == ".png")
    if not names:
        raise UserError(f"{root} holds no .png images — pass the folder with the test images")
    rt = resolve_runtime(device)
    model = load_model(checkpoint, rt.device)
    tta = run_tta(checkpoint) if tta == "auto" else tta
    x = torch.from_numpy(read_images(root, names, canvas))
    preds = predict_logits(model, x, rt, tta=tta).argmax(1).numpy()
    write_text_atomic(out, format_predictions(names, preds))
    return len(names)


def export_submission(checkpoint: str | Path, config: Config, test_images: str | Path, out: str | Path) -> int:
    """Write OUT/q1_model.pt (a copy of `checkpoint`), OUT/config.json (the run's configuration, so
    `predict` applies the same test-time augmentation) and OUT/q1_test.txt; each atomically."""
    import shutil

    out = Path(out)
    with atomic_path(out / "q1_model.pt") as tmp:
        shutil.copyfile(checkpoint, tmp)
    write_text_atomic(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    return predict_folder(out / "q1_model.pt", test_images, out / "q1_test.txt", canvas=config.geometry.canvas,
                          tta=config.train.tta)


def read_predictions(path: str | Path) -> pd.Series:
    path = require_file(path, "predictions file", "run `shortcut-study predict` first")
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, sep, label = line.strip().partition(",")
        if not sep or not label.strip().lstrip("-").isdigit():
            raise UserError(f"{path}:{n}: expected `img_N.png,<label>`, got {line.strip()!r}")
        if name in rows:
            raise UserError(f"{path}:{n}: duplicate prediction for {name} — one line per image")
        if not 0 <= int(label) < NUM_CLASSES:
            raise UserError(f"{path}:{n}: label {label} is outside 0..9")
        rows[name] = int(label)
    return pd.Series(rows, dtype=np.int64)


def grade(predictions: str | Path, labels: str | Path) -> dict[str, float | str]:
    """Grade a predictions file against `test_labels.csv` (file,label[,digit])."""
    preds = read_predictions(predictions)
    path = require_file(labels, "labels file", "it is written by `shortcut-study data build` (test_labels.csv)")
    try:
        truth = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"{path} is not a CSV ({exc})") from None
    if not {"file", "label"} <= set(truth.columns):
        raise UserError(f"{path} needs columns file,label (got {', '.join(truth.columns)})")
    missing = sorted(set(truth["file"]) - set(preds.index))
    extra = sorted(set(preds.index) - set(truth["file"]))
    if missing:
        raise UserError(f"{predictions} has no prediction for {len(missing)} image(s), e.g. {missing[0]} "
                        "— predict every image of the test folder")
    if extra:
        raise UserError(f"{predictions} names {len(extra)} image(s) not in {path}, e.g. {extra[0]}")
    digits = truth["digit"].to_numpy() if "digit" in truth.columns else None
    m: dict[str, float | str] = dict(classification_metrics(
        preds.loc[truth["file"]].to_numpy(), truth["label"].to_numpy(), digits))
    m["band"] = rubric_band(float(m["acc"]))
    return m


def format_metrics(m: dict[str, float | str]) -> str:
    labels = {"acc": "accuracy", "aligned_acc": "digit-aligned accuracy",
              "conflicting_acc": "digit-conflicting accuracy", "worst_class_acc": "worst-class accuracy",
              "worst_group_acc": "worst-group accuracy", "band": "rubric band", "n": "images"}
    lines = []
    for key, label in labels.items():
        if key not in m:
            continue
        v = m[key]
        shown = v if isinstance(v, str) else (f"{int(v)}" if key == "n" else f"{v:.2f} %")
        lines.append(f"{label:<28} {shown}")
    return "\n".join(lines)
