"""What a trained model uses: class-wise filter activations and shortcut diagnostics (numbers only;
`report.py` draws them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import normalize
from .config import NUM_CLASSES, Config, GeometryConfig
from .data.layout import SplitData, load_split, split_agreement
from .crossed import with_donor_digits
from .evaluate import evaluate_split, predict_logits, score_split
from .metrics import METRICS, eval_metrics
from .run import Run
from .runtime import Runtime, train_runtime

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


@torch.no_grad()
def class_activation_norms(model: nn.Module, split: SplitData, rt: Runtime, layers: tuple[str, ...] = ("conv1", "conv5"),
                           batch_size: int = 512, geom: GeometryConfig | None = None) -> dict[str, np.ndarray]:
    """For each layer, (10, channels): the L2 norm of each channel's raw conv output over (h, w),
    averaged over the images of each class (the handout's section 2.2)."""
    model.eval()
    idx = [LAYERS.index(name) for name in layers]
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    for start in range(0, len(split), batch_size):
        x = normalize(split.images[start:start + batch_size].to(rt.device), geom)
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


def _different_digit_donors(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each image, another image whose digit differs (a derangement over digit groups)."""
    donors = rng.permutation(len(digits))
    for _ in range(10):
        same = digits[donors] == digits
        if not same.any():
            break
        donors[same] = rng.choice(len(digits), int(same.sum()))
    return donors


@dataclass
class ShortcutReport:
    metrics: dict[str, float]  # accuracy, aligned / conflicting, ...
    digit_swap_flip_rate: float  # % of predictions that change when only the digit changes
    digit_blanked_acc: float  # accuracy with the digit patch painted gray
    cifar_blanked_acc: float  # accuracy with the CIFAR patch painted gray (digit only)
    follows_digit_rate: float  # % of digit-conflicting images predicted as their digit
    quadrant_share: dict[str, float]  # share of the occlusion drop in each quadrant (%)
    occlusion_map: np.ndarray  # (canvas, canvas) mean drop in true-class probability
    counterfactual: dict[str, float]  # cf_aligned_acc / cf_conflicting_acc / cf_gap on the crossed images


@torch.no_grad()
def _true_prob(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, rt: Runtime,
               geom: GeometryConfig | None = None) -> torch.Tensor:
    logits = predict_logits(model, images, rt, geom=geom)
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
    sample = SplitData(images, labels, digits, [split.files[i] for i in pick])
    scores = score_split(model, sample, rt, geom=geom)
    metrics = eval_metrics(scores)
    preds = torch.from_numpy(scores.preds)

    def acc(x: torch.Tensor) -> float:
        return float((predict_logits(model, x, rt, geom=geom).argmax(1) == labels).float().mean() * 100)

    swap_rate = follows = float("nan")
    if split.has_digits:
        swapped = with_donor_digits(images, torch.from_numpy(_different_digit_donors(digits.numpy(), rng)), geom)
        swap_rate = float((predict_logits(model, swapped, rt, geom=geom).argmax(1) != preds).float().mean() * 100)
        conflicting = digits != labels
        follows = float((preds[conflicting] == digits[conflicting]).float().mean() * 100) if conflicting.any() else float("nan")

    base = _true_prob(model, images, labels, rt, geom)
    drops = {name: float((base - _true_prob(model, _with_patch(images, box, geom.gray), labels, rt, geom)).clamp(min=0).mean())
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
            drop = float((sub_base - _true_prob(model, _with_patch(sub, box, geom.gray), sub_labels, rt, geom)).mean())
            heat[box] += drop
            hits[box] += 1
    return ShortcutReport(
        metrics=metrics, digit_swap_flip_rate=swap_rate,
        digit_blanked_acc=acc(_with_patch(images, geom.digit_box, geom.gray)),
        cifar_blanked_acc=acc(_with_patch(images, geom.cifar_box, geom.gray)),
        follows_digit_rate=follows, quadrant_share={k: v / total * 100 for k, v in drops.items()},
        occlusion_map=heat / np.maximum(hits, 1),
        counterfactual={k: metrics.get(k, float("nan")) for k in ("cf_aligned_acc", "cf_conflicting_acc", "cf_gap")})


def score_run(run_dir: str | Path, data: str | Path, split: str = "test") -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """A run's selected model on a labelled split (default the test set), with the run's own
    geometry, test-time augmentation, device and precision: every metric of `metrics.METRICS`
    (crossed ones included; in-distribution accuracy at the training split's agreement), with the
    predictions and labels. ({}, empty, empty) without labels."""
    model, cfg = Run(Path(run_dir)).load("cpu")
    return score_model(model, cfg, data, split)


def score_model(model: nn.Module, cfg: Config, data: str | Path,
                split: str = "test") -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """`score_run` for a model in memory, trained with `cfg`."""
    rt = train_runtime(cfg.train)
    model = model.to(rt.device)
    scored = load_split(data, split, cfg.geometry.canvas)
    if not scored.has_labels:
        return {}, np.empty(0, dtype=int), np.empty(0, dtype=int)
    metrics, preds = evaluate_split(model, scored, rt, cfg.train.eval_batch_size, cfg.train.tta, cfg.geometry,
                                    train_agreement=split_agreement(data, "train"))
    return metrics, preds, scored.labels.numpy()


def score_refit(model: nn.Module, cfg: Config, data: str | Path) -> dict[str, float]:
    """A post-hoc method (`cfg.train.method`, e.g. DFR) applied to `model`, an ERM model trained on
    `data` (`train.finish_trained`), scored on the test set: every metric of `metrics.METRICS`."""
    from .train import finish_trained

    refit = finish_trained(model, cfg, data)
    return {k: v for k, v in score_model(refit, cfg, data)[0].items() if k in METRICS}
