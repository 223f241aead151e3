"""Group-balanced training with group labels: reweighting the loss, or resampling the data, so each
group (`train.groups`; by default the 100 (class, digit) cells) counts equally. With the 100 cells
balanced, the digit carries no information about the label, as in the unbiased val and test sets.

Reweighting is SubpopBench's `ReWeight` (`subpopbench/learning/algorithms.py`: per-sample loss
times the inverse frequency of its group, normalised to mean 1); resampling is group_DRO's
`--reweight_groups` sampler without the robust loss (`data/dro_dataset.py`) and SubpopBench's
`ReSamp` (`group_balanced=True`) — both as in Idrissi et al. 2022, "Simple data balancing achieves
competitive worst-group-accuracy" (BalancingGroups `SUBG` / `RWG`).
"""

from __future__ import annotations

import torch

from ..batch import Batch
from .base import Method, TrainContext, method


def balancing_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per-group weight N / (G * n_g), G the groups present, 0 for an absent group: each present
    group weighs 1 / G in the loss, and the weights average 1 over the images."""
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


@method("reweight")
class Reweight(Method):
    """Cross-entropy weighted per group, every group weighing the same."""

    uses_groups = "train"

    def __init__(self, model, hp, ctx: TrainContext) -> None:
        super().__init__(model, hp, ctx)
        self.weights = balancing_weights(self.group_counts())

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch.x)
        return (self.per_sample_ce(logits, batch.y) * self.weights[batch.group]).mean(), logits


@method("resample")
class Resample(Method):
    """Each epoch draws N images with replacement, group-balanced: plain cross-entropy on batches in
    which every group is equally likely."""

    uses_groups = "train"

    def epoch_order(self) -> torch.Tensor:
        return self.group_balanced_order()
