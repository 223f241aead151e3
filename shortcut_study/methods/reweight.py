"""Group-balanced training with group labels: reweighting the loss, or resampling the data, so each
(class x digit-aligned) group counts equally (e.g. Sagawa et al. 2020, section 3; Idrissi et al.
2022, "Simple data balancing achieves competitive worst-group-accuracy").

`target` chooses what "balanced" means. `balanced` (the literature's default) gives the 20 groups
equal weight, so within each class the digit agrees with the label half the time: a correlation
still five times the independent rate. `independent` weights each class's aligned images to 1/10 of
the class (a uniform digit), the distribution of the unbiased val and test sets: the digit then
carries no information about the label.
"""

from __future__ import annotations

import torch

from ..batch import Batch
from ..config import NUM_CLASSES, Param
from .base import Method, TrainContext, method

TARGET = Param("balanced", choices=("balanced", "independent"),
               help="equal groups, or the digit independent of the label (aligned = 1/10 of each class)")


def balancing_weights(counts: torch.Tensor, target: str) -> torch.Tensor:
    """Per-group weight (NUM_GROUPS,) with mean 1 over the images: groups 2c / 2c+1 are class c's
    digit-conflicting / digit-aligned images; 0 for an absent group."""
    present = counts > 0
    weights = torch.zeros_like(counts)
    if target == "balanced":
        weights[present] = counts.sum() / (present.sum() * counts[present])
        return weights
    share = torch.tensor([1 - 1 / NUM_CLASSES, 1 / NUM_CLASSES], device=counts.device).repeat(NUM_CLASSES)
    per_class = counts.view(NUM_CLASSES, 2).sum(1).repeat_interleave(2)
    weights[present] = (share * per_class)[present] / counts[present]
    return weights * counts.sum() / (weights * counts).sum()


@method("reweight")
class Reweight(Method):
    """Cross-entropy weighted per group (see `target`)."""

    hparams = {"target": TARGET}
    uses_groups = "train"

    def __init__(self, model, hp, ctx: TrainContext) -> None:
        super().__init__(model, hp, ctx)
        self.weights = balancing_weights(self.group_counts(), hp["target"])

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch.x)
        return (self.per_sample_ce(logits, batch.y) * self.weights[batch.group]).mean(), logits


@method("resample")
class Resample(Method):
    """Each epoch draws N images with replacement, with probability proportional to their group's
    weight (see `target`): balanced batches, plain cross-entropy."""

    hparams = {"target": TARGET}
    uses_groups = "train"

    def sample_weights(self) -> torch.Tensor:
        return balancing_weights(self.group_counts(), self.hp["target"])[self.ctx.train.groups]
