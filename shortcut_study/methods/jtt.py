"""Just Train Twice (Liu, Haghgoo, Chen, Raghunathan, Koh, Sagawa, Liang & Finn 2021, "Just Train
Twice: Improving Group Robustness without Training Group Information", ICML).

Stage 1 trains an identification model with ERM for T epochs; the training images it gets wrong
form the error set. Stage 2 trains the final model from scratch with the error set upsampled by
lambda. No group labels are used in training.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import Param
from .base import Method, TrainContext, method


@method("jtt")
class JTT(Method):
    hparams = {
        "identify_epochs": Param(2, low=1, high=10, minimum=1, maximum=1000,
                                 help="T: epochs of the ERM identification model"),
        "upweight": Param(5.0, low=2.0, high=50.0, log=True, minimum=1.0,
                          help="lambda: how much more often a misclassified image is drawn"),
    }

    def __init__(self, model, hp, ctx: TrainContext) -> None:
        super().__init__(model, hp, ctx)
        self.errors: torch.Tensor | None = None  # bool (N,): misclassified by the stage-1 model

    def prepare(self) -> None:
        identifier = self.ctx.train_erm(int(self.hp["identify_epochs"]))
        preds = self.ctx.predict(identifier, self.ctx.train.images).argmax(1)
        self.errors = (preds.to(self.ctx.train.labels.device) != self.ctx.train.labels)

    @property
    def error_rate(self) -> float:
        return float(self.errors.float().mean()) if self.errors is not None else float("nan")

    def sample_weights(self) -> torch.Tensor | None:
        if self.errors is None:
            return None
        return 1.0 + (self.hp["upweight"] - 1.0) * self.errors.float()

    def state_dict(self) -> dict[str, Any]:
        return {"errors": self.errors.cpu() if self.errors is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        errors = state.get("errors")
        self.errors = errors.to(self.ctx.train.labels.device) if errors is not None else None
