"""Group DRO (Sagawa, Koh, Hashimoto & Liang 2020, "Distributionally Robust Neural Networks for
Group Shifts", ICLR): minimise the worst group's loss through online weights q over groups,
q_g <- q_g exp(eta * (loss_g + C / sqrt(n_g))), normalised; the loss is sum_g q_g loss_g."""

from __future__ import annotations

from typing import Any

import torch

from ..batch import NUM_GROUPS, Batch
from ..config import Param
from .base import Method, TrainContext, method


@method("groupdro")
class GroupDRO(Method):
    hparams = {
        "eta": Param(0.01, low=1e-3, high=1.0, log=True, minimum=0.0, help="step size of the group weights"),
        "adjustment": Param(0.0, low=0.0, high=4.0, minimum=0.0,
                            help="generalisation adjustment C: adds C / sqrt(n_g) to each group's loss"),
    }
    uses_groups = "train"

    def __init__(self, model, hp, ctx: TrainContext) -> None:
        super().__init__(model, hp, ctx)
        counts = self.group_counts()
        self.present = counts > 0
        self.adjust = torch.where(self.present, hp["adjustment"] / counts.clamp(min=1).sqrt(), 0.0)
        self.q = self.present.float() / self.present.sum()  # uniform over the groups that occur

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch.x)
        losses = self.per_sample_ce(logits, batch.y)
        sums = torch.zeros(NUM_GROUPS, device=losses.device).index_add_(0, batch.group, losses)
        counts = torch.bincount(batch.group, minlength=NUM_GROUPS)
        group_loss = sums / counts.clamp(min=1)  # 0 for groups absent from the batch
        with torch.no_grad():
            self.q = self.q * torch.exp(self.hp["eta"] * (group_loss + self.adjust) * (counts > 0))
            self.q = self.q / self.q.sum()
        return (group_loss * self.q).sum(), logits

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = state["q"].to(self.q.device)
