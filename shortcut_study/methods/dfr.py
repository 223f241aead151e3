"""Deep Feature Reweighting (Kirichenko, Izmailov & Wilson 2023, "Last Layer Re-Training is
Sufficient for Robustness to Spurious Correlations", ICLR), DFR(Val) as the authors' code does it
(PolinaKirichenko/deep_feature_reweighting `dfr_evaluate_spurious.py`; SpuCo's `DFR` alike):

Train with ERM; freeze the network; refit only the last layer on group-balanced held-out data, the
80-d pooled conv5 features standardised, an L1-regularised logistic regression (liblinear,
one-vs-rest for several classes):

- `dfr_on_validation_tune`: val split in two random halves; one half subsampled so every group has
  as many images as the smallest; for each C in C_OPTIONS a fit on it, scored by worst-group
  accuracy on the other half; the best C wins (the scaler fit on the balanced half).
- `dfr_on_validation_eval`: 20 refits, each on all of val subsampled to the smallest group, their
  coefficients and intercepts averaged (the scaler fit on the training split's features).

Here the two halves are the ones the run already has: `selection_split` keeps one half (the refit
half) and selects the ERM epoch on the other, which then scores C. Deviations: worst-group accuracy
on the scoring half is the minimum over the (class, digit) cells of its *crossed* version (as every
worst-group number here, `metrics.py`; its natural version holds ~25 images per cell); groups absent
from val are left out of the subsampling (the reference would subsample to 0); the base model is
the ERM epoch the run's rule selects, not the last one: the reference's `train_classifier.py`
trains a fixed number of epochs and DFR refits its `final_checkpoint.pt`. The two coincide
wherever ERM's selection keeps the last epoch (every strength-grid cell but those at agreement
0.99, where the worst-group val ties at 0 and epoch 1 is kept);
`experiments/probe/dfr_final_epoch.py` measures the difference there (`results/evidence.md`).
"""

from __future__ import annotations

import warnings
import numpy as np
import torch
from torch import nn

from ..config import Param
from ..crossed import can_cross, crossed_views
from ..data.layout import SplitData
from ..metrics import METRICS, Scores
from .base import Method, TrainContext, method

C_OPTIONS = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # dfr_evaluate_spurious.py, WaterBirds


def pooled_features(model: nn.Module, images: torch.Tensor, predict) -> np.ndarray:
    """The 80-d input of the last layer (global average of conv5) for each uint8 image."""
    captured: list[torch.Tensor] = []
    hook = model.fc.register_forward_hook(lambda mod, inputs, out: captured.append(inputs[0].detach().float().cpu()))
    try:
        predict(model, images)
    finally:
        hook.remove()
    return torch.cat(captured).numpy() if captured else np.zeros((0, model.fc.in_features), dtype=np.float32)


def balanced_subsample(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions of a subsample with every present group cut to the smallest one's size, group by
    group (`g_idx` / `min_g` in the reference)."""
    present = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    smallest = min(len(rows) for rows in present)
    return np.concatenate([rng.permutation(rows)[:smallest] for rows in present])


def fit_last_layer(features: np.ndarray, labels: np.ndarray, c: float, seed: int,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(coef (classes, d), intercept (classes,)) of an L1 logistic regression, one-vs-rest with
    liblinear as `LogisticRegression(penalty="l1", solver="liblinear")` did for several classes in
    the scikit-learn the authors used (1.9 wants the wrapper); a class absent from `labels` gets a
    score that never wins."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    clf = OneVsRestClassifier(LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear", random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # liblinear's convergence note: a tolerance, not an error
        clf.fit(features, labels)
    coef = np.zeros((num_classes, features.shape[1]))
    intercept = np.full(num_classes, -1e4)
    classes = clf.classes_
    if len(classes) == 2:  # a binary problem: one estimator for the positive class
        est = clf.estimators_[0]
        coef[classes[1]], intercept[classes[1]] = est.coef_[0], est.intercept_[0]
        coef[classes[0]], intercept[classes[0]] = -est.coef_[0], -est.intercept_[0]
    else:
        for cls, est in zip(classes, clf.estimators_):
            coef[cls], intercept[cls] = est.coef_[0], est.intercept_[0]
    return coef, intercept


def averaged_refit(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, c: float, retrains: int,
                   seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean coefficients and intercepts of `retrains` fits, each on a fresh group-balanced
    subsample (`dfr_on_validation_eval`); `features` already standardised."""
    rng = np.random.default_rng(seed)
    coefs, intercepts = [], []
    for _ in range(retrains):
        rows = balanced_subsample(groups, rng)
        coef, intercept = fit_last_layer(features[rows], labels[rows], c, seed, num_classes)
        coefs.append(coef)
        intercepts.append(intercept)
    return np.mean(coefs, axis=0), np.mean(intercepts, axis=0)


@method("dfr")
class DFR(Method):
    hparams = {
        "retrains": Param(20, minimum=1, maximum=1000, search=False,
                          help="refits on group-balanced subsamples whose coefficients are averaged"),
    }
    uses_groups = "val"  # to balance the refit's groups and to score C by worst group
    post_hoc = True  # its training is ERM's, its loss ERM's: the method is the refit
    held_out_fraction = 0.5

    def __init__(self, model, hp, ctx: TrainContext) -> None:
        super().__init__(model, hp, ctx)
        self.held_out: SplitData | None = None
        self.scoring: SplitData | None = None
        self.chosen_c: float | None = None

    def selection_split(self, val: SplitData) -> SplitData:
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(self.ctx.cfg.train.seed))
        cut = int(len(val) * self.held_out_fraction)
        self.held_out, self.scoring = val.take(order[:cut]), val.take(order[cut:])
        return self.scoring

    def tune_c(self, model: nn.Module) -> float:
        """The C of C_OPTIONS whose fit on the balanced refit half scores the best worst-group
        accuracy on the crossed scoring half (`dfr_on_validation_tune`, one retrain)."""
        from sklearn.preprocessing import StandardScaler

        held, scoring, seed = self.held_out, self.scoring, self.ctx.cfg.train.seed
        n_classes = model.fc.out_features
        rows = balanced_subsample(self.groups_of(held).numpy(), np.random.default_rng(seed))
        feats = pooled_features(model, held.images, self.ctx.predict)[rows]
        scaler = StandardScaler().fit(feats)
        x_fit, y_fit = scaler.transform(feats), held.labels.numpy()[rows]
        if not can_cross(scoring):
            return C_OPTIONS[0]
        crossed = [scaler.transform(pooled_features(model, images, self.ctx.predict))
                   for _, images in crossed_views(scoring, self.ctx.cfg.geometry)]
        scores = {}
        for c in C_OPTIONS:
            coef, intercept = fit_last_layer(x_fit, y_fit, c, seed, n_classes)
            preds = np.stack([(x @ coef.T + intercept).argmax(1) for x in crossed], axis=1)
            s = Scores(preds[:, 0], scoring.labels.numpy(), scoring.digits.numpy(), preds)
            scores[c] = METRICS["worst_group_acc"].compute(s)
        return max(C_OPTIONS, key=lambda c: scores[c])  # first of equals: the reference's argmax

    def finish(self, model: nn.Module) -> bool:
        from sklearn.preprocessing import StandardScaler

        assert self.held_out is not None and self.scoring is not None, "selection_split runs before finish"
        self.chosen_c = self.tune_c(model)
        val = SplitData(torch.cat([self.held_out.images, self.scoring.images]),
                        torch.cat([self.held_out.labels, self.scoring.labels]),
                        torch.cat([self.held_out.digits, self.scoring.digits]),
                        self.held_out.files + self.scoring.files)
        scaler = StandardScaler().fit(pooled_features(model, self.ctx.train.images, self.ctx.predict))
        features = scaler.transform(pooled_features(model, val.images, self.ctx.predict))
        coef, intercept = averaged_refit(features, val.labels.numpy(), self.groups_of(val).numpy(), self.chosen_c,
                                         int(self.hp["retrains"]), self.ctx.cfg.train.seed, model.fc.out_features)
        set_last_layer(model, coef, intercept, scaler.mean_, scaler.scale_)
        return True


@torch.no_grad()
def set_last_layer(model: nn.Module, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray,
                   scale: np.ndarray) -> None:
    """fc(x) = coef . (x - mean) / scale + intercept, folded into the layer's weight and bias."""
    w = torch.as_tensor(coef / scale, dtype=model.fc.weight.dtype)
    b = torch.as_tensor(intercept - (coef * mean / scale).sum(1), dtype=model.fc.bias.dtype)
    model.fc.weight.copy_(w.to(model.fc.weight.device))
    model.fc.bias.copy_(b.to(model.fc.bias.device))
