"""What a *group* is, found by name (`train.groups`).

`class_digit` (the default) is the field's definition: a group is (label, value of the spurious
attribute), here (CIFAR class, digit shown), 10 x 10 = 100 groups, id = 10 * label + digit — as
group_DRO (kohpangwei/group_DRO `data/cub_dataset.py`: `group_array = y * n_places + place`),
SubpopBench (`all_g = y * num_attributes + a`, `subpopbench/learning/algorithms.py`), BalancingGroups
and SpuCo's SpuCoMNIST (K^2 groups) index them. Balancing these 100 cells makes the digit carry no
information about the label.

`aligned` is an ablation kept to reproduce the tool's earlier tables: (class, digit == label), 20
groups, id = 2 * label + aligned. Balancing it leaves the digit equal to the label in half of each
class — five times the unbiased rate — and at agreement 0.1 *creates* a shortcut.

Digit-aligned / digit-conflicting is a way to report (`metrics.py`), not a grouping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import CIFAR_CLASSES, NUM_CLASSES, NUM_DIGITS
from .registry import GROUPINGS


@dataclass(frozen=True)
class Grouping:
    count: int  # number of groups
    ids: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (labels, digits) -> group id, digits known
    name: Callable[[int], str]  # group id -> readable name


GROUPINGS.register("class_digit")(Grouping(
    NUM_CLASSES * NUM_DIGITS, lambda y, d: y * NUM_DIGITS + d,
    lambda g: f"{CIFAR_CLASSES[g // NUM_DIGITS]}, digit {g % NUM_DIGITS}"))
GROUPINGS.register("aligned")(Grouping(
    2 * NUM_CLASSES, lambda y, d: 2 * y + (d == y).long(),
    lambda g: f"{CIFAR_CLASSES[g // 2]}, digit {'aligned' if g % 2 else 'conflicting'}"))


def num_groups(scheme: str) -> int:
    return GROUPINGS[scheme].count


def group_ids(labels: torch.Tensor, digits: torch.Tensor, scheme: str = "class_digit") -> torch.Tensor:
    """Group id of each image under `scheme`; -1 where the label or the digit is unknown (the
    course's own folder before `data annotate`)."""
    known = (digits >= 0) & (labels >= 0)
    groups = GROUPINGS[scheme].ids(labels.clamp(min=0), digits.clamp(min=0))
    return torch.where(known, groups, torch.full_like(groups, -1))


def group_name(group: int, scheme: str = "class_digit") -> str:
    return GROUPINGS[scheme].name(group)
