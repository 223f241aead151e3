"""Training methods (how a batch becomes a loss), found by name: the hook for debiasing methods.

A method sees the model, the augmented batch and its labels and returns the loss to minimise and
the logits. ERM is plain (label-smoothed) cross-entropy; GroupDRO, JTT, LfF, … plug in here as
further entries with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig

Method = Callable[[nn.Module, torch.Tensor, torch.Tensor, TrainConfig], tuple[torch.Tensor, torch.Tensor]]


def erm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing), logits


METHODS: dict[str, Method] = {"erm": erm}
