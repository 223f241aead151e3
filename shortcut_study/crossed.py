"""The crossed split: every image of a split rendered once with each of the 10 digits, its digit
patch replaced by that of a random image of the same split showing that digit (seeded, so every
model is scored on the same images). In the crossed split the digit is independent of everything
else in the image, and each (class, digit) cell holds every image of the class: the cells
`metrics.py` takes group accuracies over. The donors are the split's own digit patches, so the
rendered images look exactly like the split's."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .config import NUM_DIGITS, GeometryConfig
from .data.layout import SplitData


def with_donor_digits(images: torch.Tensor, donors: torch.Tensor, geom: GeometryConfig) -> torch.Tensor:
    """`images` with each digit patch replaced by the digit patch of image `donors[i]`."""
    dy, dx = geom.digit_box
    out = images.clone()
    out[:, :, dy, dx] = images[:, :, dy, dx][donors]
    return out


def donors_showing(digits: np.ndarray, wanted: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each image, a random image of the split whose digit is `wanted[i]`."""
    donors = np.empty(len(wanted), dtype=np.int64)
    for d in np.unique(wanted):
        rows = np.flatnonzero(wanted == d)
        donors[rows] = rng.choice(np.flatnonzero(digits == d), len(rows))
    return donors


def can_cross(split: SplitData) -> bool:
    """Every image's digit is known and every digit occurs in the split (to donate its patch)."""
    return split.has_digits and len(np.unique(split.digits.numpy())) == NUM_DIGITS


def crossed_views(split: SplitData, geom: GeometryConfig, seed: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """(d, the split's images all showing digit d) for d = 0..9; `can_cross(split)` must hold."""
    digits = split.digits.numpy()
    rng = np.random.default_rng(seed)
    for d in range(NUM_DIGITS):
        donors = torch.from_numpy(donors_showing(digits, np.full(len(split), d), rng))
        yield d, with_donor_digits(split.images, donors, geom)
