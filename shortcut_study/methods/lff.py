"""Learning from Failure (Nam, Cha, Ahn, Lee & Shin 2020, "Learning from Failure: Training Debiased
Classifier from Biased Classifier", NeurIPS), as the authors' code does it (alinlab/LfF):

Two models, initialised alike, train side by side on the same batches (`train.py`: `model_b`,
`model_d` from the same `get_model`). The biased model minimises the generalized cross-entropy
(`module/loss.py`, `GeneralizedCELoss`: CE * p_y^q * q, the weight detached), which amplifies its
reliance on whatever is easy — here the digit. The debiased model (the one kept) minimises
cross-entropy weighted by the relative difficulty W(x) = CE_B(x) / (CE_B(x) + CE_D(x) + 1e-8), the
per-sample losses smoothed by an exponential moving average (`util.py`, `EMA.update`: the first
visit takes the loss itself, later ones alpha * old + (1 - alpha) * new) and divided by their
class's maximum over the whole training set (`EMA.max_loss`). No group labels.

Deviations: one optimizer steps both models (the reference has one each, with the same settings —
the same updates for SGD); SubpopBench's q range, U(0.05, 0.95) (`hparams_registry.py`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Batch
from ..config import NUM_CLASSES, Param
from .base import Method, TrainContext, method


@method("lff")
class LfF(Method):
    hparams = {
        "q": Param(0.7, low=0.05, high=0.95, minimum=0.01, maximum=1.0, help="GCE exponent of the biased model"),
        "ema": Param(0.7, low=0.5, high=0.99, minimum=0.0, maximum=0.999,
                     help="alpha: moving-average factor of the per-sample losses"),
    }

    def __init__(self, model, hp, ctx: TrainContext) -> None:
        super().__init__(model, hp, ctx)
        device = ctx.train.labels.device
        self.biased = ctx.new_model()  # initialised as the debiased model is (train.init)
        n = len(ctx.train)
        self.loss_ema = torch.zeros(2, n, device=device)  # row 0 biased, row 1 debiased
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.biased.parameters())

    def _class_normalised(self, row: int) -> torch.Tensor:
        labels = self.ctx.train.labels
        top = torch.zeros(NUM_CLASSES, device=labels.device).scatter_reduce(
            0, labels, self.loss_ema[row], reduce="amax", include_self=True)
        return self.loss_ema[row] / top[labels].clamp(min=1e-8)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits_b = self.biased(batch.x).float()
        logits_d = self.model(batch.x).float()
        ce_b = F.cross_entropy(logits_b, batch.y, reduction="none")
        ce_d = F.cross_entropy(logits_d, batch.y, reduction="none")
        with torch.no_grad():
            i, a = batch.index, self.hp["ema"]
            # first visit: the loss itself; then alpha * old + (1 - alpha) * new
            keep = torch.where(self.seen[i], a, 0.0)
            self.loss_ema[0, i] = keep * self.loss_ema[0, i] + (1 - keep) * ce_b
            self.loss_ema[1, i] = keep * self.loss_ema[1, i] + (1 - keep) * ce_d
            self.seen[i] = True
            lb, ld = self._class_normalised(0)[i], self._class_normalised(1)[i]
            weight = lb / (lb + ld + 1e-8)
            p_true = logits_b.softmax(1).gather(1, batch.y[:, None]).squeeze(1)
            gce_weight = p_true ** self.hp["q"] * self.hp["q"]
        loss = (ce_b * gce_weight).mean() + (self.per_sample_ce(logits_d, batch.y) * weight).mean()
        return loss, logits_d

    def state_dict(self) -> dict[str, Any]:
        return {"biased": {k: v.detach().cpu() for k, v in self.biased.state_dict().items()},
                "loss_ema": self.loss_ema.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.biased.load_state_dict(state["biased"])
        self.loss_ema = state["loss_ema"].to(self.loss_ema.device)
        self.seen = state["seen"].to(self.seen.device)
