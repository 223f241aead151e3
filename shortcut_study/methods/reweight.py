"""Group-balanced training with group labels: reweighting the loss, or resampling the data, so each
(class x digit-aligned) group counts equally (e.g. Sagawa et al. 2020, section 3; Idrissi et al.
2022, "Simple data balancing achieves competitive worst-group-accuracy")."""

from __future__ import annotations

import torch

from ..batch import Batch
from .base import Method, TrainContext, method


def _balancing(counts: torch.Tensor) -> torch.Tensor:
    """Per-group weight N / (G * n_g) over the G groups present (0 for an absent group)."""
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


@method("reweight")
class Reweight(Method):
    """Cross-entropy weighted by N / (G * n_g): every group carries the same total weight."""

    uses_groups = "train"

    def __init__(self, model, hp, ctx: TrainContext) -> None:
        super().__init__(model, hp, ctx)
        self.weights = _balancing(self.group_counts())

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch.x)
        return (self.per_sample_ce(logits, batch.y) * self.weights[batch.group]).mean(), logits


@method("resample")
class Resample(Method):
    """Each epoch draws N images with replacement, with probability inversely proportional to the
    size of their group: group-balanced batches, plain cross-entropy."""

    uses_groups = "train"

    def sample_weights(self) -> torch.Tensor:
        return _balancing(self.group_counts())[self.ctx.train.groups]
