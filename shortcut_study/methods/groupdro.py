"""Group DRO (Sagawa, Koh, Hashimoto & Liang 2020, "Distributionally Robust Neural Networks for
Group Shifts", ICLR), as the authors' code does it (kohpangwei/group_DRO):

- `loss.py`, `LossComputer.compute_group_avg` / `compute_robust_loss`: per-group mean loss of the
  batch (0 for a group absent from it); adjusted loss = group loss + C / sqrt(n_g) for *every*
  group, n_g its training count; q <- q * exp(eta * adjusted loss), normalised; the loss is
  adjusted group loss . q. (The reference adds the adjustment in place, so its returned loss
  includes it; it is a constant, so the gradient is that of group loss . q.) q starts uniform.
- `data/dro_dataset.py`, `get_loader(reweight_groups=True)`: the authors' commands pass
  `--reweight_groups`, so batches are drawn group-balanced (with replacement). `sampling=natural`
  draws them as the data is.

Deviation: a group with no training image (possible only at agreement 1.0) is left out of q — the
reference would divide by sqrt(0).
"""

from __future__ import annotations

from typing import Any

import torch

from ..batch import Batch
from ..config import Param
from .base import Method, TrainContext, method


@method("groupdro")
class GroupDRO(Method):
    hparams = {
        # SubpopBench (`hparams_registry.py`): default 1e-2, searched over 10^U(-3, -1).
        "eta": Param(0.01, low=1e-3, high=1e-1, log=True, minimum=0.0, maximum=100.0,
                     help="step size of the group weights q"),
        "adjustment": Param(0.0, low=0.0, high=4.0, minimum=0.0, maximum=1e3,
                            help="generalisation adjustment C: adds C / sqrt(n_g) to each group's loss"),
        "sampling": Param("balanced", choices=("balanced", "natural"), search=False,
                          help="balanced: group-balanced batches, as the authors run it; natural: as the data is"),
    }
    uses_groups = "train"

    def __init__(self, model, hp, ctx: TrainContext) -> None:
        super().__init__(model, hp, ctx)
        counts = self.group_counts()
        self.present = counts > 0
        self.adjust = torch.where(self.present, hp["adjustment"] / counts.clamp(min=1).sqrt(), 0.0)
        self.q = self.present.float() / self.present.sum()  # uniform over the groups that occur

    def epoch_order(self) -> torch.Tensor | None:
        return self.group_balanced_order() if self.hp["sampling"] == "balanced" else None

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch.x)
        losses = self.per_sample_ce(logits, batch.y)
        sums = torch.zeros(self.num_groups, device=losses.device).index_add_(0, batch.group, losses)
        counts = torch.bincount(batch.group, minlength=self.num_groups)
        group_loss = sums / (counts + (counts == 0))  # 0 for groups absent from the batch
        adjusted = group_loss + self.adjust
        with torch.no_grad():
            # q * exp(eta * adjusted), normalised — in log space, so a large eta cannot overflow.
            self.q = torch.softmax(self.q.log() + self.hp["eta"] * adjusted.detach(), 0)
        return adjusted @ self.q, logits

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = state["q"].to(self.q.device)
