"""Deep Feature Reweighting (Kirichenko, Izmailov & Wilson 2023, "Last Layer Re-Training is
Sufficient for Robustness to Spurious Correlations", ICLR).

Train with ERM; then freeze the network and refit only the last layer on group-balanced held-out
data: half of val (never used for model selection: the other half selects the epoch), the 80-d
pooled conv5 features standardised, scikit-learn's L1-regularised logistic regression. Groups are
balanced by sample weights N / (G * n_g) over all held-out images, which is what the paper's
averaging over group-balanced subsamples estimates, with less variance. Group labels are used on
the held-out half of val only.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ..batch import NUM_GROUPS
from ..config import Param
from ..data.layout import SplitData
from .base import Method, TrainContext, method


def pooled_features(model: nn.Module, split: SplitData, predict) -> np.ndarray:
    """The 80-d input of the last layer (global average of conv5) for every image of `split`."""
    captured: list[torch.Tensor] = []
    hook = model.fc.register_forward_hook(lambda mod, inputs, out: captured.append(inputs[0].detach().float().cpu()))
    try:
        predict(model, split.images)
    finally:
        hook.remove()
    return torch.cat(captured).numpy()


@method("dfr")
class DFR(Method):
    hparams = {
        "C": Param(1.0, low=0.01, high=10.0, log=True, minimum=1e-6, help="inverse regularisation strength"),
        "l1_ratio": Param(1.0, low=0.0, high=1.0, minimum=0.0, maximum=1.0,
                          help="elastic-net mix of the refit: 1 = L1 as in the paper, 0 = L2"),
        # The paper balances the groups of held-out data that carries the spurious correlation. Our
        # val split is already unbiased (the digit independent of the label); balancing its 20
        # (class x aligned) groups would make the digit agree with the label half the time.
        "balance": Param("groups", choices=("groups", "none"),
                         help="groups: weights N / (G * n_g) as in the paper; none: the held-out images as they are"),
    }
    uses_groups = "val"  # to balance the refit's groups, and to report per-group accuracy
    held_out_fraction = 0.5

    def __init__(self, model, hp, ctx: TrainContext) -> None:
        super().__init__(model, hp, ctx)
        self.held_out: SplitData | None = None

    def selection_split(self, val: SplitData) -> SplitData:
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(self.ctx.cfg.train.seed))
        cut = int(len(val) * self.held_out_fraction)
        self.held_out = val.take(order[:cut])
        return val.take(order[cut:])

    def finish(self, model: nn.Module) -> bool:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        held = self.held_out
        assert held is not None, "selection_split runs before finish"
        features = pooled_features(model, held, self.ctx.predict)
        labels, groups = held.labels.numpy(), held.groups.numpy()
        counts = np.bincount(groups, minlength=NUM_GROUPS).astype(float)
        weights = len(groups) / ((counts > 0).sum() * counts[groups]) if self.hp["balance"] == "groups" else None
        scaler = StandardScaler().fit(features)
        clf = LogisticRegression(C=self.hp["C"], l1_ratio=self.hp["l1_ratio"], solver="saga", max_iter=2000,
                                 random_state=self.ctx.cfg.train.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # saga's convergence warning: a tolerance note, not an error
            clf.fit(scaler.transform(features), labels, sample_weight=weights)
        coef = np.zeros((model.fc.out_features, features.shape[1]))
        intercept = np.full(model.fc.out_features, -1e4)  # a class absent from the held-out half never wins
        coef[clf.classes_] = clf.coef_
        intercept[clf.classes_] = clf.intercept_
        scale = scaler.scale_
        with torch.no_grad():
            w = torch.as_tensor(coef / scale, dtype=model.fc.weight.dtype)
            b = torch.as_tensor(intercept - (coef * scaler.mean_ / scale).sum(1), dtype=model.fc.bias.dtype)
            model.fc.weight.copy_(w)
            model.fc.bias.copy_(b)
        return True
