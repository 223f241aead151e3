"""What one training step sees: images with their labels, digits, groups and sample indices.

`digit` is the digit each image *shows* — after digit-patch shuffle, the donor's — and `group` is
computed from it (`groups.py`), so a group method with shuffle trains on the groups it sees.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    x: torch.Tensor  # augmented, normalised images (B, 3, H, W)
    y: torch.Tensor  # labels (B,)
    digit: torch.Tensor  # digit shown (B,), -1 = unknown
    group: torch.Tensor  # group id (B,) under train.groups, -1 = unknown
    index: torch.Tensor  # position of each image in the training split (B,)

    def __len__(self) -> int:
        return len(self.y)

    def with_x(self, x: torch.Tensor) -> Batch:
        return replace(self, x=x)
