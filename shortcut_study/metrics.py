"""The metric table: every number that model selection, the sweep, the methods table, the benchmark,
the strength study, the bench and the report show is declared here once — key, title, unit, what it
needs, whether seed tables give it a 95 % interval, and how it is computed. Adding a metric is one
entry in `METRICS`.

A metric is computed from `Scores`: the predictions on a split as it is (the *natural* split), and,
where the split has digit labels, the predictions on its *crossed* version — every image rendered
once with each of the 10 digits (`evaluate.crossed_predictions`). Groups are (class, digit) cells,
as in the field (SubpopBench `utils/eval_helper.py`: `min_group` is the minimum accuracy over
`y=..,a=..` groups, `adjusted_accuracy` their mean; SpuCo `evaluator.py` alike). On the natural
10,000-image test set a cell holds ~100 images, too few for a stable minimum; the crossed test gives
every cell ~1,000, and the digit is exactly independent of everything else in the image. The
natural split is predicted with the run's test-time views (`train.tta`), the crossed one with a
single view (`evaluate.crossed_predictions` says why): compare crossed metrics with each other and
across methods, and natural ones likewise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .config import NUM_CLASSES, NUM_DIGITS, SELECT_METRICS


@dataclass(frozen=True)
class Scores:
    """What the metrics are computed from, for one split."""

    preds: np.ndarray  # (N,) predicted class on the natural split
    labels: np.ndarray  # (N,)
    digits: np.ndarray | None = None  # (N,) digit shown, -1 = unknown
    crossed: np.ndarray | None = None  # (N, NUM_DIGITS) predicted class with the digit patch showing d
    train_agreement: float = math.nan  # fraction of training images whose digit equals the label

    @property
    def has_digits(self) -> bool:
        return self.digits is not None and len(self.digits) > 0 and bool((self.digits >= 0).all())

    @property
    def aligned(self) -> np.ndarray:
        return self.digits == self.labels

    @property
    def correct(self) -> np.ndarray:
        return self.preds == self.labels

    @property
    def crossed_correct(self) -> np.ndarray:
        """(N, NUM_DIGITS) bool: image i rendered with digit d is classified correctly."""
        return self.crossed == self.labels[:, None]

    def cells(self) -> np.ndarray:
        """(NUM_CLASSES, NUM_DIGITS) accuracy (%) of each (class, digit) cell of the crossed split;
        NaN for a class absent from the split."""
        correct = self.crossed_correct
        out = np.full((NUM_CLASSES, NUM_DIGITS), np.nan)
        for c in range(NUM_CLASSES):
            rows = self.labels == c
            if rows.any():
                out[c] = correct[rows].mean(0) * 100
        return out


def _pct(mask: np.ndarray) -> float:
    return float(mask.mean() * 100) if len(mask) else math.nan


def _worst_class(s: Scores) -> float:
    per_class = [_pct(s.correct[s.labels == c]) for c in range(NUM_CLASSES) if (s.labels == c).any()]
    return min(per_class) if per_class else math.nan


def _cf_aligned(s: Scores) -> float:
    """The crossed images whose digit equals the label: the same image with its digit set to the label."""
    return _pct(s.crossed_correct[np.arange(len(s.labels)), s.labels])


def _cf_conflicting(s: Scores) -> float:
    """The crossed images whose digit differs from the label (each image once with each other digit)."""
    correct = s.crossed_correct
    other = np.ones_like(correct, dtype=bool)
    other[np.arange(len(s.labels)), s.labels] = False
    return float(correct[other].mean() * 100) if other.any() else math.nan


def _in_distribution(s: Scores) -> float:
    """The crossed test reweighted to the training split's agreement a: the digit equals the label
    with probability a, else it is one of the 9 others, uniformly (as the builder draws it)."""
    a = s.train_agreement
    return a * _cf_aligned(s) + (1 - a) * _cf_conflicting(s)


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    needs: str  # "labels" | "digits" (natural digit labels) | "crossed" | "agreement" (crossed + train agreement)
    compute: Callable[[Scores], float]
    unit: str = "%"  # "%" for an accuracy, "points" for a difference of two
    interval: bool = True  # seed tables give it a 95 % Student-t interval
    help: str = ""

    def available(self, s: Scores) -> bool:
        if self.needs == "labels":
            return len(s.labels) > 0
        if self.needs == "digits":
            return s.has_digits
        crossed = s.crossed is not None and s.has_digits
        return crossed and (self.needs == "crossed" or math.isfinite(s.train_agreement))


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("acc", "overall", "labels", lambda s: _pct(s.correct), help="accuracy on the split as it is"),
    Metric("aligned_acc", "digit-aligned", "digits", lambda s: _pct(s.correct[s.aligned]),
           help="images whose digit equals the label (~10 % of an unbiased split)"),
    Metric("conflicting_acc", "digit-conflicting", "digits", lambda s: _pct(s.correct[~s.aligned]),
           help="images whose digit differs from the label"),
    Metric("gap", "aligned − conflicting", "digits",
           lambda s: _pct(s.correct[s.aligned]) - _pct(s.correct[~s.aligned]), unit="points",
           help="the shortcut's cost on the natural split"),
    Metric("cf_aligned_acc", "digit set to label", "crossed", _cf_aligned, interval=False,
           help="every image with its digit set to its label"),
    Metric("cf_conflicting_acc", "digit set to another", "crossed", _cf_conflicting, interval=False,
           help="every image with each other digit"),
    Metric("cf_gap", "paired counterfactual gap", "crossed", lambda s: _cf_aligned(s) - _cf_conflicting(s),
           unit="points", help="the same images, digit set to the label minus set to another: due to the digit alone"),
    Metric("worst_group_acc", "worst group", "crossed", lambda s: float(np.nanmin(s.cells())),
           help="minimum over the 100 (class, digit) cells of the crossed split"),
    Metric("mean_group_acc", "mean over groups", "crossed", lambda s: float(np.nanmean(s.cells())),
           help="mean over the 100 (class, digit) cells of the crossed split"),
    Metric("worst_class_acc", "worst class", "labels", _worst_class, help="minimum over the 10 classes; needs no digit"),
    Metric("id_acc", "in-distribution", "agreement", _in_distribution,
           help="the crossed split reweighted to the training split's agreement rate"),
)}

# Every selection criterion names a declared metric.
assert set(SELECT_METRICS.values()) <= set(METRICS), "config.SELECT_METRICS names an undeclared metric"


def needs_crossed(keys: Iterable[str]) -> bool:
    """Whether any of these metrics needs the crossed split (ten predictions per image)."""
    return any(METRICS[k].needs in ("crossed", "agreement") for k in keys if k in METRICS)


def eval_metrics(s: Scores) -> dict[str, float]:
    """Every declared metric that `s` can give (key -> value), plus the counts `n` and
    `aligned_fraction` (%) that intervals on the natural split need."""
    out = {m.key: m.compute(s) for m in METRICS.values() if m.available(s)}
    out["n"] = float(len(s.labels))
    if s.has_digits:
        out["aligned_fraction"] = _pct(s.aligned)
    return out


def gap_interval(m: dict[str, float]) -> tuple[float, float]:
    """Aligned minus conflicting accuracy and the half-width of its 95 % normal interval (points),
    from one split's `eval_metrics` (the natural aligned group is small: ~10 % of an unbiased split)."""
    n_al = m["n"] * m["aligned_fraction"] / 100
    n_co = m["n"] - n_al
    pa, pc = m["aligned_acc"] / 100, m["conflicting_acc"] / 100
    se = math.sqrt(pa * (1 - pa) / max(n_al, 1) + pc * (1 - pc) / max(n_co, 1)) * 100
    return m["aligned_acc"] - m["conflicting_acc"], 1.96 * se


def seed_interval(values: Iterable[float]) -> tuple[float, float, float, float]:
    """mean, sd, and the 95 % Student-t interval over seeds (NaN sd / interval from fewer than two
    finite values; NaN throughout from none)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return (math.nan,) * 4
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def format_value(key: str, value: float) -> str:
    """A metric's value as tables show it: `83.25 %`, `+2.10 points`."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:+.2f} points" if METRICS[key].unit == "points" else f"{value:.2f} %"


def format_metrics(m: dict[str, float], keys: Iterable[str] | None = None) -> str:
    """One line per declared metric present in `m`, aligned, in the table's order."""
    keys = list(keys) if keys is not None else list(METRICS)
    width = max(len(METRICS[k].title) for k in keys)
    return "\n".join(f"{METRICS[k].title:<{width}}  {format_value(k, m[k])}" for k in keys if k in m)
