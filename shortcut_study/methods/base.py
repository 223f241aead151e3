"""The method interface, after DomainBed / SubpopBench: a small class per method owning its state.

A method is built from the model being trained (the module the step calls), its own
hyperparameters (declared once in `hparams`, default and search range side by side) and a
`TrainContext` (the training split on the device, the config, the runtime, helpers). The loop asks
it for the loss of each batch and calls its hooks; whatever it keeps between steps goes through
`state_dict` / `load_state_dict`, so `--resume` restores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import NUM_GROUPS, Batch
from ..config import Config, Param
from ..data.layout import SplitData
from ..errors import UserError
from ..registry import METHODS
from ..runtime import Runtime


@dataclass
class TrainContext:
    """What a method may use besides the batch."""

    cfg: Config
    train: SplitData  # the training split, images / labels / digits / groups on the device
    rt: Runtime
    data_dir: str
    # Trains a fresh model with plain ERM on the training split for N epochs (JTT's first stage).
    train_erm: Callable[[int], nn.Module]
    # Logits of a model on uint8 images, in eval mode, no augmentation.
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Register a Method subclass under `name` (the value of `train.method`)."""

    def add(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return add


class Method:
    """Empirical risk minimisation; subclasses override what they change."""

    name: ClassVar[str] = ""
    hparams: ClassVar[dict[str, Param]] = {}
    # Where the method needs group labels (class x digit-aligned): "train" (in training), "val"
    # (to fit on held-out data) or None (never).
    uses_groups: ClassVar[str | None] = None

    def __init__(self, model: nn.Module, hp: dict[str, Any], ctx: TrainContext) -> None:
        self.model, self.hp, self.ctx = model, hp, ctx
        self.label_smoothing = ctx.cfg.train.label_smoothing

    # ---- the step ----
    def per_sample_ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=self.label_smoothing)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch.x)
        return F.cross_entropy(logits.float(), batch.y, label_smoothing=self.label_smoothing), logits

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters besides the model's that the optimizer should train (LfF's biased model)."""
        return []

    def sample_weights(self) -> torch.Tensor | None:
        """Per-image draw weights for the next epoch (drawn with replacement), or None for a
        plain shuffle."""
        return None

    # ---- hooks ----
    def prepare(self) -> None:
        """Before the first epoch of a fresh (not resumed) run."""

    def on_epoch_end(self, epoch: int) -> None:
        """After each epoch's optimizer steps."""

    def selection_split(self, val: SplitData) -> SplitData:
        """The part of val used for model selection (DFR keeps the rest for its refit)."""
        return val

    def finish(self, model: nn.Module) -> bool:
        """After training, on the selected model; True if it changed the model's weights."""
        return False

    # ---- state ----
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ---- helpers ----
    def group_counts(self) -> torch.Tensor:
        """Training images per group (NUM_GROUPS,), on the device."""
        return torch.bincount(self.ctx.train.groups, minlength=NUM_GROUPS).float()


def check_groups(method_cls: type[Method], train: SplitData, val: SplitData, data_dir: str) -> None:
    """A one-line error when a method needs group labels the data does not have."""
    split = {"train": train, "val": val}.get(method_cls.uses_groups or "")
    if split is not None and not split.has_digits:
        raise UserError(f"method {method_cls.name} needs digit labels on the {method_cls.uses_groups} split "
                        f"(groups = class x digit-aligned) and {data_dir} has none: run "
                        f"`shortcut-study data annotate {data_dir}`")
