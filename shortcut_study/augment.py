"""Batched on-device augmentations: each samples its own per-image randomness for a whole batch.

`augment_batch` turns a uint8 batch into a normalised float batch, shuffles digit patches (returning
the digits each image then shows) and applies the registry's augmentations in `ORDER`; a strength
of 0 switches one off. Semantics follow torchvision v2:
RandomErasing after normalisation fills with 0 (the mean colour), GaussianNoise after
normalisation is unclipped. Erasing clamps an oversized box to the image where torchvision would
re-draw it (up to 10 times): a slightly different box-size law, no different in kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import AugmentConfig, GeometryConfig

Augmentation = Callable[[torch.Tensor, AugmentConfig, GeometryConfig], torch.Tensor]


def normalize(images_u8: torch.Tensor, geom: GeometryConfig | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (x/255 - mean) / std with the layout's statistics (default: the
    handout's), as one fused multiply-add per channel."""
    geom = geom or GeometryConfig()
    mean = torch.tensor(geom.mean, device=images_u8.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(geom.std, device=images_u8.device, dtype=dtype).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std)
    return torch.addcmul(-mean / std, images_u8.to(dtype), scale)


def _coin(x: torch.Tensor, p: float) -> torch.Tensor:
    return (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)


def flip_patch(x: torch.Tensor, geom: GeometryConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror the CIFAR patch alone (all images, or those where `mask`); the digit stays put."""
    ys, xs = geom.cifar_box
    patch = x[:, :, ys, xs]
    flipped = patch.flip(-1)
    x = x.clone()
    x[:, :, ys, xs] = flipped if mask is None else torch.where(mask, flipped, patch)
    return x


def shift_patch(x: torch.Tensor, geom: GeometryConfig, dy: int, dx: int) -> torch.Tensor:
    """Shift the CIFAR patch of every image by (dy, dx) pixels inside its box, reflect-padded
    (the deterministic counterpart of `translate`, for test-time views)."""
    if dy == 0 and dx == 0:
        return x
    t, size = max(abs(dy), abs(dx)), geom.cifar_size
    ys, xs = geom.cifar_box
    padded = F.pad(x[:, :, ys, xs], (t, t, t, t), mode="reflect")
    x = x.clone()
    x[:, :, ys, xs] = padded[:, :, t - dy:t - dy + size, t - dx:t - dx + size]
    return x


def digit_shuffle(x: torch.Tensor, digits: torch.Tensor, cfg: AugmentConfig,
                  geom: GeometryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each chosen image the digit patch of a random image of the batch: the model still sees
    digits, but they no longer agree with the label. Returns the images and the digit each one now
    shows (the donor's), so groups are computed from what the model sees."""
    if cfg.digit_shuffle_p <= 0:
        return x, digits
    ys, xs = geom.digit_box
    b = x.shape[0]
    keep = torch.arange(b, device=x.device)
    source = torch.where(_coin(x, cfg.digit_shuffle_p).view(-1), torch.randperm(b, device=x.device), keep)
    x = x.clone()
    x[:, :, ys, xs] = x[source][:, :, ys, xs]
    return x, digits[source.to(digits.device)]


def translate(x: torch.Tensor, cfg: AugmentConfig, geom: GeometryConfig) -> torch.Tensor:
    """Shift the CIFAR patch by up to `translate` pixels each way, reflect-padded, inside its box."""
    t = cfg.translate
    if t <= 0:
        return x
    ys, xs = geom.cifar_box
    b, size = x.shape[0], geom.cifar_size
    padded = F.pad(x[:, :, ys, xs], (t, t, t, t), mode="reflect").permute(0, 2, 3, 1)
    base = torch.arange(size, device=x.device)
    rows = torch.randint(0, 2 * t + 1, (b, 1), device=x.device) + base
    cols = torch.randint(0, 2 * t + 1, (b, 1), device=x.device) + base
    shifted = padded[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    x = x.clone()
    x[:, :, ys, xs] = shifted.permute(0, 3, 1, 2)
    return x


def flip(x: torch.Tensor, cfg: AugmentConfig, geom: GeometryConfig) -> torch.Tensor:
    """Horizontal flip of the CIFAR patch ('patch'), of the whole canvas ('image'), or both."""
    if cfg.flip == "none" or cfg.flip_p <= 0:
        return x
    if cfg.flip in ("patch", "both"):
        x = flip_patch(x, geom, _coin(x, cfg.flip_p))
    if cfg.flip in ("image", "both"):
        x = torch.where(_coin(x, cfg.flip_p), x.flip(-1), x)
    return x


def erase(x: torch.Tensor, cfg: AugmentConfig, geom: GeometryConfig) -> torch.Tensor:
    """RandomErasing: a box of area fraction U(scale) and aspect ratio logU(0.3, 3.3) set to 0."""
    if cfg.erase_p <= 0:
        return x
    b, _, h, w = x.shape
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(cfg.erase_scale_min, cfg.erase_scale_max) * h * w
    ratio = torch.exp(torch.empty(b, device=dev).uniform_(math.log(0.3), math.log(3.3)))
    eh = torch.sqrt(area * ratio).round().clamp(1, h)
    ew = torch.sqrt(area / ratio).round().clamp(1, w)
    top = (torch.rand(b, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(b, device=dev) * (w - ew + 1)).floor()
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    box = ((ys >= top.view(-1, 1, 1)) & (ys < (top + eh).view(-1, 1, 1))
           & (xs >= left.view(-1, 1, 1)) & (xs < (left + ew).view(-1, 1, 1)))
    chosen = torch.rand(b, device=dev) < cfg.erase_p
    return x.masked_fill((box & chosen.view(-1, 1, 1)).unsqueeze(1), 0.0)


def noise(x: torch.Tensor, cfg: AugmentConfig, geom: GeometryConfig) -> torch.Tensor:
    """GaussianNoise(mean=0, sigma) on the normalised image, unclipped."""
    if cfg.noise_sigma <= 0:
        return x
    return x + cfg.noise_sigma * torch.randn_like(x)


# Digit shuffle is not in this table: it changes the digits a batch carries, so it runs first, in
# `augment_batch`, and returns them.
AUGMENTATIONS: dict[str, Augmentation] = {
    "translate": translate,
    "flip": flip,
    "erase": erase,
    "noise": noise,
}
# Geometry first, then the ones that act on normalised values.
ORDER = ("translate", "flip", "erase", "noise")


def augment_batch(images_u8: torch.Tensor, digits: torch.Tensor, cfg: AugmentConfig,
                  geom: GeometryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch on the device -> augmented, normalised float32 batch, and the digits it shows."""
    x, digits = digit_shuffle(normalize(images_u8, geom), digits, cfg, geom)
    for name in ORDER:
        x = AUGMENTATIONS[name](x, cfg, geom)
    return x, digits
