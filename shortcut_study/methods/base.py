"""The method interface, after DomainBed / SubpopBench: a small class per method owning its state.

A method is built from the model being trained (the module the step calls), its own
hyperparameters (declared once in `hparams`, default and search range side by side) and a
`TrainContext` (the training split on the device, the config, the runtime, helpers). The loop asks
it for the loss of each batch, for the order of each epoch's images, and calls its hooks; whatever
it keeps between steps goes through `state_dict` / `load_state_dict`, so `--resume` restores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Batch
from ..config import Config, Param
from ..data.layout import SplitData
from ..errors import UserError
from ..groups import group_ids, num_groups
from ..registry import METHODS
from ..runtime import Runtime


@dataclass
class TrainContext:
    """What a method may use besides the batch."""

    cfg: Config
    train: SplitData  # the training split, images / labels / digits on the device
    rt: Runtime
    data_dir: str
    # A fresh model initialised as the trained one is (train.init): LfF's biased model.
    new_model: Callable[[], nn.Module]
    # The epoch-N snapshot of an ERM run on a recipe (its schedule over that recipe's
    # train.epochs): JTT's identification model.
    train_erm: Callable[[int, Config], nn.Module]
    # Logits of a model on uint8 images, in eval mode, no augmentation.
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    # Steps of the method's own trainings (JTT's identification model) whose gradient
    # `train.grad_clip` scaled down: they count with the run's first epoch.
    clipped_steps: int = 0


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
    # Where the method needs group labels ((class, digit), `train.groups`): "train" (in training),
    # "val" (to fit on held-out data) or None (never).
    uses_groups: ClassVar[str | None] = None
    # True when the method trains as ERM does and is only its `finish` (DFR's last-layer refit): it
    # can then be applied to an ERM model trained elsewhere (`train.finish_trained`, the strength
    # grid's shared ERM cell) instead of training again.
    post_hoc: ClassVar[bool] = False

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

    # ---- the epoch ----
    def epoch_order(self) -> torch.Tensor | None:
        """Positions in the training split of the next epoch's images, in order (draws with
        replacement, repeats), or None for a plain shuffle of every image once."""
        return None

    def epoch_length(self) -> int:
        """Images per epoch (sizes the schedule): the training split, unless `epoch_order` says otherwise."""
        return len(self.ctx.train)

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

    # ---- groups ----
    @property
    def num_groups(self) -> int:
        return num_groups(self.ctx.cfg.train.groups)

    def groups_of(self, split: SplitData) -> torch.Tensor:
        """Group id of each image of `split` under `train.groups`."""
        return group_ids(split.labels, split.digits, self.ctx.cfg.train.groups)

    def group_counts(self) -> torch.Tensor:
        """Training images per group (num_groups,), on the device."""
        return torch.bincount(self.groups_of(self.ctx.train), minlength=self.num_groups).float()

    def group_balanced_order(self) -> torch.Tensor:
        """N draws with replacement, each image with probability proportional to 1 / (its group's
        size): every group equally likely in expectation (group_DRO `data/dro_dataset.py`,
        `get_loader(reweight_groups=True)`: WeightedRandomSampler(len / group_counts[g], len, replacement=True))."""
        counts = self.group_counts()
        weights = (len(self.ctx.train) / counts.clamp(min=1))[self.groups_of(self.ctx.train)]
        return torch.multinomial(weights, len(self.ctx.train), replacement=True)


def check_groups(method_cls: type[Method], train: SplitData, val: SplitData, data_dir: str) -> None:
    """A one-line error when a method needs group labels the data does not have."""
    split = {"train": train, "val": val}.get(method_cls.uses_groups or "")
    if split is not None and not split.has_digits:
        raise UserError(f"method {method_cls.name} needs digit labels on the {method_cls.uses_groups} split "
                        f"(groups = (class, digit)) and {data_dir} has none: run "
                        f"`shortcut-study data annotate {data_dir}`")
