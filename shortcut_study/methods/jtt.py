"""Just Train Twice (Liu, Haghgoo, Chen, Raghunathan, Koh, Sagawa, Liang & Finn 2021, "Just Train
Twice: Improving Group Robustness without Training Group Information", ICML), as the authors' code
does it (anniesch/jtt):

- The error set is the training images misclassified by the epoch-T snapshot of an ERM run
  (`process_training.py`: `wrong_1_times` from `output_train_epoch_{T}.csv`, the ERM run's
  predictions on the training set at epoch T). Here the ERM run is this recipe — its schedule over
  the run's `train.epochs`, so the snapshot is not annealed — stopped after T epochs; it trains
  without digit shuffle unless `identify_shuffle` asks for it (shuffle knows where the digit is).
- Each epoch of the final model is the training set concatenated with extra copies of the error
  set (`run_expt.py`: `ConcatDataset([train_data, Subset(train_data, aug_indices * up_weight)])`),
  shuffled: every image is seen every epoch and an error-set image lambda times. The authors'
  `--up_weight` counts the *extra* copies; here lambda is the paper's upweight factor (the error
  set's weight in the loss, lambda_up), so there are lambda - 1 extra copies.
- lambda's search range is SubpopBench's, 10^U(0, 2.5) (`hparams_registry.py`); the authors
  searched {20, 50, 100}. With `epoch = "concatenated"` (the authors') an epoch grows to
  N + (lambda - 1) |E| images, and the schedule with it.

**Deviation, by default: `epoch = "fixed"`.** Each epoch is N images drawn without replacement
from that concatenation (an error-set image lambda times as likely as another), so JTT takes the
same optimizer steps as every other method. This is SubpopBench's protocol, which gives every
algorithm the same step budget (`train.py`: `n_steps`). Its JTT (`learning/algorithms.py`, `JTT_Stage2`)
weights the loss of an error by lambda, and the expected gradient of such a batch is the same.
Why: the authors' epochs cost up to 30x an epoch of the other methods (measured in the quick
benchmark: 481,536 images against 14,976), so the method with the largest budget would also be
the one tuned over it.

No group labels are used.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..config import Param
from ..errors import UserError
from .base import Method, TrainContext, method


def upsampled_epoch(n: int, errors: torch.Tensor, upweight: int) -> torch.Tensor:
    """Positions of one epoch, unshuffled: every image once, then each error-set image
    `upweight - 1` more times (the training set concatenated with the extra copies)."""
    extra = torch.nonzero(errors, as_tuple=True)[0].repeat(upweight - 1)
    return torch.cat([torch.arange(n, device=errors.device), extra])


@method("jtt")
class JTT(Method):
    hparams = {
        "identify_epochs": Param(2, low=1, high=4, minimum=1, maximum=1000,
                                 help="T: epochs of the ERM run whose snapshot picks the error set"),
        "upweight": Param(10, low=1, high=316, log=True, minimum=1, maximum=1000,
                          help="lambda: an error-set image's weight (it is seen lambda times per epoch)"),
        "epoch": Param("fixed", choices=("fixed", "concatenated"), search=False,
                       help="fixed: N images per epoch drawn from the upsampled set (every method's steps); "
                            "concatenated: the authors' epoch of N + (lambda - 1) |E| images"),
        "identify_shuffle": Param(False, choices=(False, True), search=False,
                                  help="train the identification model with the recipe's digit shuffle"),
    }

    def __init__(self, model, hp, ctx: TrainContext) -> None:
        super().__init__(model, hp, ctx)
        if hp["identify_epochs"] > ctx.cfg.train.epochs:
            raise UserError(f"method.identify_epochs={hp['identify_epochs']} exceeds train.epochs="
                            f"{ctx.cfg.train.epochs}: the error set comes from an epoch of this recipe's ERM run")
        self.errors: torch.Tensor | None = None  # bool (N,): misclassified by the epoch-T ERM snapshot

    def prepare(self) -> None:
        cfg = self.ctx.cfg
        if not self.hp["identify_shuffle"]:
            cfg = replace(cfg, augment=replace(cfg.augment, digit_shuffle_p=0.0))
        identifier = self.ctx.train_erm(int(self.hp["identify_epochs"]), cfg)
        preds = self.ctx.predict(identifier, self.ctx.train.images).argmax(1)
        self.errors = preds.to(self.ctx.train.labels.device) != self.ctx.train.labels

    @property
    def error_rate(self) -> float:
        return float(self.errors.float().mean()) if self.errors is not None else float("nan")

    def epoch_order(self) -> torch.Tensor | None:
        if self.errors is None:
            return None
        order = upsampled_epoch(len(self.ctx.train), self.errors, int(self.hp["upweight"]))
        return order[torch.randperm(len(order), device=order.device)[: self.epoch_length()]]

    def epoch_length(self) -> int:
        if self.errors is None or self.hp["epoch"] == "fixed":
            return len(self.ctx.train)
        return len(self.ctx.train) + (int(self.hp["upweight"]) - 1) * int(self.errors.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"errors": self.errors.cpu() if self.errors is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        errors = state.get("errors")
        self.errors = errors.to(self.ctx.train.labels.device) if errors is not None else None
