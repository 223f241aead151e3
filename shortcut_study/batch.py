"""What one training step sees: images with their labels, digits, groups and sample indices.

A group is (class, digit-aligned): group id = 2 * label + (digit == label), 20 groups; -1 where the
digit is unknown (the course's own folder before `data annotate`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import NUM_CLASSES

NUM_GROUPS = 2 * NUM_CLASSES


def group_ids(labels: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    groups = 2 * labels + (digits == labels).long()
    return torch.where((digits >= 0) & (labels >= 0), groups, torch.full_like(groups, -1))


def group_name(group: int) -> str:
    from .config import CIFAR_CLASSES

    return f"{CIFAR_CLASSES[group // 2]}, digit {'aligned' if group % 2 else 'conflicting'}"


@dataclass
class Batch:
    x: torch.Tensor  # augmented, normalised images (B, 3, H, W)
    y: torch.Tensor  # labels (B,)
    digit: torch.Tensor  # digit shown (B,), -1 = unknown
    group: torch.Tensor  # group id (B,), -1 = unknown
    index: torch.Tensor  # position of each image in the training split (B,)

    def __len__(self) -> int:
        return len(self.y)

    def with_x(self, x: torch.Tensor) -> Batch:
        return replace(self, x=x)
