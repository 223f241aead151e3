"""Test-time augmentation, found by name (`train.tta`): the views whose softmax probabilities are
averaged. Views move or mirror the CIFAR patch only: the digit stays where the test set has it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .augment import flip_patch, shift_patch
from .config import GeometryConfig
from .registry import TTA

View = Callable[[torch.Tensor, GeometryConfig], torch.Tensor]


def _identity(x: torch.Tensor, geom: GeometryConfig) -> torch.Tensor:
    return x


def _shifted_views(flipped: bool) -> list[View]:
    return [(lambda x, g, dy=dy, dx=dx: shift_patch(flip_patch(x, g) if flipped else x, g, dy, dx))
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


TTA.register("none")([_identity])
TTA.register("flip")([_identity, flip_patch])
TTA.register("flip_shift")(_shifted_views(False) + _shifted_views(True))

# Per-epoch model selection uses this cheap setting when a costlier one is configured.
MONITOR_TTA = "flip"


def monitor_tta(tta: str) -> str:
    return tta if len(TTA[tta]) <= len(TTA[MONITOR_TTA]) else MONITOR_TTA
