"""What a trained model uses: class-wise filter activations and shortcut diagnostics (numbers only;
`report.py` draws them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import normalize
from .config import NUM_CLASSES, GeometryConfig
from .data.layout import SplitData
from .data.layout import load_split
from .evaluate import classification_metrics, evaluate_split, predict_logits
from .run import Run
from .runtime import Runtime, resolve_runtime

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


@torch.no_grad()
def class_activation_norms(model: nn.Module, split: SplitData, rt: Runtime, layers: tuple[str, ...] = ("conv1", "conv5"),
                           batch_size: int = 512) -> dict[str, np.ndarray]:
    """For each layer, (10, channels): the L2 norm of each channel's raw conv output over (h, w),
    averaged over the images of each class (the handout's section 2.2)."""
    model.eval()
    idx = [LAYERS.index(name) for name in layers]
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    for start in range(0, len(split), batch_size):
        x = normalize(split.images[start:start + batch_size].to(rt.device))
        y = split.labels[start:start + batch_size]
        _, feats = model(x, intermediate_outputs=True)  # fp32: norms are summed over many images
        onehot = F.one_hot(y, NUM_CLASSES).double()
        counts += onehot.sum(0)
        for name, i in zip(layers, idx):
            norms = feats[i].flatten(2).norm(dim=2).double().cpu()  # (b, c)
            sums[name] = sums.get(name, 0) + onehot.T @ norms
    return {name: (s / counts.clamp(min=1)[:, None]).numpy() for name, s in sums.items()}


def selectivity(norms: np.ndarray) -> dict[str, np.ndarray]:
    """Per filter: coefficient of variation across classes, and a selectivity index
    (max - mean of the other classes) / (max + mean of the other classes), 0 = uniform, 1 = one class."""
    mean = norms.mean(0)
    cv = norms.std(0) / np.maximum(mean, 1e-12)
    top = norms.max(0)
    rest = (norms.sum(0) - top) / (norms.shape[0] - 1)
    si = (top - rest) / np.maximum(top + rest, 1e-12)
    return {"cv": cv, "si": si, "preferred": norms.argmax(0)}


def _with_patch(images: torch.Tensor, box: tuple[slice, slice], value: torch.Tensor | int) -> torch.Tensor:
    out = images.clone()
    out[:, :, box[0], box[1]] = value
    return out


def _with_donor_digits(images: torch.Tensor, donors: torch.Tensor, geom: GeometryConfig) -> torch.Tensor:
    """`images` with each digit patch replaced by the digit patch of image `donors[i]`."""
    dy, dx = geom.digit_box
    out = images.clone()
    out[:, :, dy, dx] = images[:, :, dy, dx][donors]
    return out


def _different_digit_donors(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each image, another image whose digit differs (a derangement over digit groups)."""
    donors = rng.permutation(len(digits))
    for _ in range(10):
        same = digits[donors] == digits
        if not same.any():
            break
        donors[same] = rng.choice(len(digits), int(same.sum()))
    return donors


def _donors_showing(digits: np.ndarray, wanted: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each image, a random image of the split whose digit is `wanted[i]`."""
    donors = np.empty(len(wanted), dtype=np.int64)
    for d in np.unique(wanted):
        rows = np.flatnonzero(wanted == d)
        donors[rows] = rng.choice(np.flatnonzero(digits == d), len(rows))
    return donors


@torch.no_grad()
def counterfactual_digit_accuracy(model: nn.Module, split: SplitData, rt: Runtime, geom: GeometryConfig | None = None,
                                  tta: str = "none", seed: int = 0) -> dict[str, float]:
    """Accuracy on the same images twice: with the digit patch replaced by one showing the label
    (`cf_aligned_acc`) and by one showing another, uniformly drawn digit (`cf_conflicting_acc`).

    A paired measure of the shortcut's pull: unlike the natural aligned group (~10 % of an
    unbiased test set, so its accuracy alone is uncertain by about ±2.5 points), both numbers
    are over every image, and their difference is due to the digit alone. Digit patches are taken
    from the split itself, so they look exactly like test digits. NaN without digit labels or when
    some digit never occurs in the split.
    """
    digits, labels = split.digits.numpy(), split.labels.numpy()
    if not split.has_digits or len(np.unique(digits)) < NUM_CLASSES:
        return {"cf_aligned_acc": float("nan"), "cf_conflicting_acc": float("nan")}
    geom = geom or GeometryConfig()
    rng = np.random.default_rng(seed)
    other = (labels + rng.integers(1, NUM_CLASSES, len(labels))) % NUM_CLASSES  # uniform over digits != label
    out = {}
    for key, wanted in (("cf_aligned_acc", labels), ("cf_conflicting_acc", other)):
        images = _with_donor_digits(split.images, torch.from_numpy(_donors_showing(digits, wanted, rng)), geom)
        preds = predict_logits(model, images, rt, tta=tta, geom=geom).argmax(1)
        out[key] = float((preds == split.labels).float().mean() * 100)
    return out


@dataclass
class ShortcutReport:
    metrics: dict[str, float]  # accuracy, aligned / conflicting, ...
    digit_swap_flip_rate: float  # % of predictions that change when only the digit changes
    digit_blanked_acc: float  # accuracy with the digit patch painted gray
    cifar_blanked_acc: float  # accuracy with the CIFAR patch painted gray (digit only)
    follows_digit_rate: float  # % of digit-conflicting images predicted as their digit
    quadrant_share: dict[str, float]  # share of the occlusion drop in each quadrant (%)
    occlusion_map: np.ndarray  # (canvas, canvas) mean drop in true-class probability
    counterfactual: dict[str, float]  # cf_aligned_acc / cf_conflicting_acc, see counterfactual_digit_accuracy


@torch.no_grad()
def _true_prob(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, rt: Runtime) -> torch.Tensor:
    logits = predict_logits(model, images, rt)
    return logits.softmax(1).gather(1, labels[:, None]).squeeze(1)


def quadrants(geom: GeometryConfig) -> dict[str, tuple[slice, slice]]:
    c, d = geom.cifar_box, geom.digit_box
    return {"CIFAR patch": c, "digit patch": d,
            "top right (gray)": (c[0], slice(c[1].stop, geom.canvas)),
            "bottom left (gray)": (d[0], slice(0, d[1].start))}


@torch.no_grad()
def shortcut_diagnostics(model: nn.Module, split: SplitData, rt: Runtime, geom: GeometryConfig | None = None,
                         max_images: int = 2000, occlusion_size: int = 8, stride: int = 4, seed: int = 0) -> ShortcutReport:
    geom = geom or GeometryConfig()
    rng = np.random.default_rng(seed)
    n = min(len(split), max_images)
    pick = np.sort(rng.choice(len(split), n, replace=False))
    images, labels, digits = split.images[pick], split.labels[pick], split.digits[pick]
    preds = predict_logits(model, images, rt).argmax(1)
    metrics = classification_metrics(preds.numpy(), labels.numpy(), digits.numpy())

    def acc(x: torch.Tensor) -> float:
        return float((predict_logits(model, x, rt).argmax(1) == labels).float().mean() * 100)

    swap_rate = follows = float("nan")
    if split.has_digits:
        swapped = _with_donor_digits(images, torch.from_numpy(_different_digit_donors(digits.numpy(), rng)), geom)
        swap_rate = float((predict_logits(model, swapped, rt).argmax(1) != preds).float().mean() * 100)
        conflicting = digits != labels
        follows = float((preds[conflicting] == digits[conflicting]).float().mean() * 100) if conflicting.any() else float("nan")

    base = _true_prob(model, images, labels, rt)
    drops = {name: float((base - _true_prob(model, _with_patch(images, box, geom.gray), labels, rt)).clamp(min=0).mean())
             for name, box in quadrants(geom).items()}
    total = sum(drops.values()) or 1.0

    # Occlusion map: a gray square slid over the canvas; mean drop in the true-class probability.
    sub = images[: min(n, 500)]
    sub_labels, sub_base = labels[: len(sub)], base[: len(sub)]
    canvas = geom.canvas
    heat = np.zeros((canvas, canvas))
    hits = np.zeros((canvas, canvas))
    for top in range(0, canvas - occlusion_size + 1, stride):
        for left in range(0, canvas - occlusion_size + 1, stride):
            box = (slice(top, top + occlusion_size), slice(left, left + occlusion_size))
            drop = float((sub_base - _true_prob(model, _with_patch(sub, box, geom.gray), sub_labels, rt)).mean())
            heat[box] += drop
            hits[box] += 1
    return ShortcutReport(
        metrics=metrics, digit_swap_flip_rate=swap_rate,
        digit_blanked_acc=acc(_with_patch(images, geom.digit_box, geom.gray)),
        cifar_blanked_acc=acc(_with_patch(images, geom.cifar_box, geom.gray)),
        follows_digit_rate=follows, quadrant_share={k: v / total * 100 for k, v in drops.items()},
        occlusion_map=heat / np.maximum(hits, 1),
        counterfactual=counterfactual_digit_accuracy(
            model, SplitData(images, labels, digits, [split.files[i] for i in pick]), rt, geom, seed=seed))


def test_scores(run_dir: str | Path, data: str | Path) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """A run's selected model on the labelled test split, with the run's own geometry and test-time
    augmentation: overall, digit-aligned / conflicting and worst-group accuracy, the paired
    counterfactual; with the predictions and labels. ({}, empty, empty) without test labels."""
    rt = resolve_runtime()
    model, cfg = Run(Path(run_dir)).load(rt.device)
    test = load_split(data, "test", cfg.geometry.canvas)
    if not test.has_labels:
        return {}, np.empty(0, dtype=int), np.empty(0, dtype=int)
    metrics, preds = evaluate_split(model, test, rt, tta=cfg.train.tta, geom=cfg.geometry)
    metrics.update(counterfactual_digit_accuracy(model, test, rt, cfg.geometry, tta=cfg.train.tta))
    return metrics, preds, test.labels.numpy()


def shortcut_scores(metrics: dict[str, float]) -> dict[str, float]:
    """The numbers a shortcut table reports from `test_scores`' metrics: overall, digit-aligned and
    digit-conflicting accuracy, their gap, worst group and the paired counterfactual gap (NaN where
    the split has no digit labels)."""
    get = lambda key: metrics.get(key, math.nan)  # noqa: E731
    return {"acc": get("acc"), "aligned_acc": get("aligned_acc"), "conflicting_acc": get("conflicting_acc"),
            "gap": get("aligned_acc") - get("conflicting_acc"), "worst_group_acc": get("worst_group_acc"),
            "cf_gap": get("cf_aligned_acc") - get("cf_conflicting_acc")}


def test_metrics(run_dir: str | Path, data: str | Path) -> dict[str, float]:
    """`test_scores` without the predictions."""
    return test_scores(run_dir, data)[0]
